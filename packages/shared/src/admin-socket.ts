// The admin socket: a 0600 Unix socket in the agent's directory through which CLI commands that
// change state (pair, unpair, queue flush/delete) reach a running agent, so only one process ever
// writes peers.json or tokens.json. Protocol: one JSON request line, one JSON response line.
import { chmod, rm } from "node:fs/promises";
import net from "node:net";
import { isMxtunnelError } from "./errors.js";

export interface AdminRequest {
  command: string;
  args?: Record<string, unknown>;
}

export type AdminResponse =
  | { ok: true; result: unknown }
  | { ok: false; error: { code: string; message: string } };

export type AdminHandler = (request: AdminRequest) => Promise<unknown>;

const MAX_REQUEST = 64 * 1024;

export async function serveAdminSocket(path: string, handler: AdminHandler): Promise<net.Server> {
  // A socket file left by a crashed agent would make listen fail with EADDRINUSE. The caller holds
  // the state lock, so no live agent owns it.
  await rm(path, { force: true });
  const server = net.createServer((socket) => {
    let buffered = "";
    socket.setEncoding("utf8");
    socket.on("error", () => socket.destroy());
    socket.on("data", (chunk: string) => {
      buffered += chunk;
      if (buffered.length > MAX_REQUEST) {
        socket.end(
          `${JSON.stringify({ ok: false, error: { code: "ADMIN_REQUEST_TOO_LARGE", message: "request too large" } })}\n`,
        );
        return;
      }
      const newline = buffered.indexOf("\n");
      if (newline < 0) return;
      const line = buffered.slice(0, newline);
      socket.pause();
      void respond(line).then((response) => socket.end(`${JSON.stringify(response)}\n`));
    });
  });

  const respond = async (line: string): Promise<AdminResponse> => {
    try {
      const request = JSON.parse(line) as AdminRequest;
      if (!request || typeof request.command !== "string") throw new Error("request needs a command");
      return { ok: true, result: await handler(request) };
    } catch (error) {
      const code = isMxtunnelError(error) ? error.code : "ADMIN_ERROR";
      return { ok: false, error: { code, message: error instanceof Error ? error.message : String(error) } };
    }
  };

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(path, () => {
      server.off("error", reject);
      resolve();
    });
  });
  await chmod(path, 0o600);
  return server;
}

export class AdminUnavailable extends Error {}

/** Sends one request to a running agent. Throws AdminUnavailable when no agent listens. */
export function callAdminSocket(path: string, request: AdminRequest, timeoutMs = 30_000): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(path);
    let buffered = "";
    let connected = false;
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`the agent did not answer on ${path} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.setEncoding("utf8");
    socket.on("connect", () => {
      connected = true;
      socket.write(`${JSON.stringify(request)}\n`);
    });
    socket.on("data", (chunk: string) => {
      buffered += chunk;
    });
    socket.on("error", (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (!connected && (error.code === "ENOENT" || error.code === "ECONNREFUSED"))
        reject(new AdminUnavailable(path));
      else reject(error);
    });
    socket.on("end", () => {
      clearTimeout(timer);
      try {
        const response = JSON.parse(buffered) as AdminResponse;
        if (response.ok) resolve(response.result);
        else reject(Object.assign(new Error(response.error.message), { code: response.error.code }));
      } catch {
        reject(new Error(`the agent sent an unreadable answer on ${path}`));
      }
    });
  });
}

/** Asks the running agent (read-only commands: status, probe); null when no agent listens. */
export async function askRunningAgent<T>(
  socketPath: string,
  command: string,
  timeoutMs: number,
): Promise<T | null> {
  try {
    return (await callAdminSocket(socketPath, { command }, timeoutMs)) as T;
  } catch (error) {
    if (error instanceof AdminUnavailable) return null;
    throw error;
  }
}

/**
 * What every state-changing CLI command does: ask the running agent over its admin socket, or,
 * when none runs, do the work itself while holding the state lock (`acquire`), so two writers
 * never race on the same files.
 */
export async function viaAgentOrLocked<T>(
  socketPath: string,
  request: AdminRequest,
  acquire: () => Promise<{ release(): Promise<void> }>,
  offline: () => Promise<T>,
  timeoutMs?: number,
): Promise<T> {
  try {
    return (await callAdminSocket(socketPath, request, timeoutMs)) as T;
  } catch (error) {
    if (!(error instanceof AdminUnavailable)) throw error;
  }
  const lock = await acquire();
  try {
    return await offline();
  } finally {
    await lock.release();
  }
}
