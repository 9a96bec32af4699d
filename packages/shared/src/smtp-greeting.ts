// Prompt SMTP greetings for smtp-server. Its SMTPConnection.init() (3.21) greets only after a fixed
// `setTimeout(() => this.connectionReady(), 100)` ("a small delay for detecting early talkers"), with
// no option to change it; with one message per session that pause caps a server near
// 10 × sessions messages per second. This wraps a server's connect() so every new connection greets
// after one turn of the event loop instead: bytes that had already reached the socket when the
// connection was handed over are still read first and refused with "421 You talk too soon".
//
// It relies on smtp-server internals (connect(), the `connections` set, connectionReady(),
// needsUpgrade, _closing); when any of them is missing it leaves the stock behaviour in place, and
// packages/shared/test/smtp-greeting.test.ts pins them so an upgrade that changes them fails loudly.

interface ConnectionInternals {
  connectionReady?: unknown;
  needsUpgrade?: unknown;
  _closing?: unknown;
  _closed?: unknown;
}

interface ServerInternals {
  connect?: unknown;
  connections?: unknown;
}

/**
 * Makes `server` (an smtp-server SMTPServer) greet new connections at once. Returns false, changing
 * nothing, if the server does not have the internals this relies on.
 */
export function greetWithoutDelay(server: object): boolean {
  const internals = server as ServerInternals;
  const connect = internals.connect;
  const connections = internals.connections;
  if (typeof connect !== "function" || !(connections instanceof Set)) return false;
  internals.connect = function connectAndGreet(this: unknown, ...args: unknown[]) {
    let created: ConnectionInternals | undefined;
    // connect() creates the connection, adds it to `connections` and calls init(), all synchronously.
    const add = (connection: ConnectionInternals) => {
      created ??= connection;
      return Set.prototype.add.call(connections, connection);
    };
    Object.defineProperty(connections, "add", { value: add, configurable: true, writable: true });
    try {
      return connect.apply(this, args);
    } finally {
      delete (connections as { add?: unknown }).add;
      if (created) greetSoon(created);
    }
  };
  return true;
}

function greetSoon(connection: ConnectionInternals): void {
  const ready = connection.connectionReady;
  if (typeof ready !== "function") return;
  // Implicit TLS: init() greets only after the handshake; a refusal (maxClients) has already closed.
  if (connection.needsUpgrade !== false || connection._closing !== false) return;
  let called = false;
  // The stock timer calls this.connectionReady() later: the instance method makes that a no-op.
  connection.connectionReady = function connectionReadyOnce(this: unknown, ...args: unknown[]) {
    if (called) return;
    called = true;
    return ready.apply(this, args);
  };
  // Two turns: the first runs in this turn's check phase, the second after the next poll phase, which
  // reads whatever the client sent before the hand-over (the socket starts reading on nextTick).
  setImmediate(() =>
    setImmediate(() => {
      if (connection._closing === false && connection._closed === false) {
        (connection.connectionReady as () => void)();
      }
    }),
  );
}
