export * from "./agent.js";
export * from "./config.js";
export * from "./connect.js";
export * from "./edge-link.js";
export * from "./pairing.js";
export * from "./service-connector.js";
export * from "./state.js";
export * from "./status.js";
