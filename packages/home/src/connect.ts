// Dials the edge's WebSocket endpoint and turns every way that can fail into one clear sentence.
import {
  HandshakeError,
  MxtunnelError,
  offeredVersions,
  PROTOCOL_VERSION,
  SUBPROTOCOL,
  SUPPORTED_HEADER,
  versionMismatchMessage,
  WebSocketTransport,
  WS_MAX_PAYLOAD,
} from "@mxtunnel/shared";
import WebSocket from "ws";

export async function connectToEdge(
  baseUrl: string,
  path: string,
  timeoutMs: number,
): Promise<WebSocketTransport> {
  const url = new URL(path, baseUrl.endsWith("/") ? baseUrl : `${baseUrl}/`);
  const ws = new WebSocket(url, [SUBPROTOCOL], {
    maxPayload: WS_MAX_PAYLOAD,
    perMessageDeflate: false,
    handshakeTimeout: timeoutMs,
  });
  return new Promise((resolve, reject) => {
    const fail = (error: Error) => {
      ws.removeAllListeners();
      ws.on("error", () => {});
      ws.terminate();
      reject(error);
    };
    ws.once("open", () => {
      ws.removeAllListeners();
      resolve(new WebSocketTransport(ws));
    });
    ws.once("unexpected-response", (_req, res) => {
      let body = "";
      // Listening for the response takes it out of ws's hands: a reset while its body arrives is ours.
      res.on("error", (error) => fail(error));
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => {
        if (body.length < 1024) body += chunk;
      });
      res.on("end", () => {
        if (res.statusCode === 426) {
          const supported = offeredVersions(String(res.headers[SUPPORTED_HEADER] ?? ""));
          fail(
            new MxtunnelError(
              "VERSION_MISMATCH",
              versionMismatchMessage(
                { role: "home", version: PROTOCOL_VERSION },
                { role: "edge", versions: supported },
              ),
            ),
          );
        } else if (res.statusCode === 429 || res.statusCode === 503) {
          fail(
            new MxtunnelError(
              "RATE_LIMITED",
              `the edge at ${url.origin} is limiting handshakes (${res.statusCode}): ${body.trim()}`,
            ),
          );
        } else {
          fail(
            new HandshakeError(
              "HANDSHAKE_FAILED",
              `the edge at ${url.origin} answered HTTP ${res.statusCode}: ${body.trim() || "no mxtunnel endpoint there"}`,
            ),
          );
        }
      });
      res.on("error", () =>
        fail(new HandshakeError("HANDSHAKE_FAILED", `HTTP ${res.statusCode} from ${url.origin}`)),
      );
    });
    ws.once("error", (error: NodeJS.ErrnoException) => {
      const why =
        error.code === "ECONNREFUSED"
          ? "connection refused (is mxtunnel-edge running and the port open?)"
          : error.message;
      fail(
        new HandshakeError("HANDSHAKE_FAILED", `cannot reach the edge at ${url.origin}: ${why}`, {
          cause: error,
        }),
      );
    });
  });
}
