export * from "./agent.js";
export * from "./config.js";
export * from "./forward-listener.js";
export * from "./init.js";
export * from "./state.js";
export * from "./status.js";
export * from "./tunnel-server.js";
