export * from "./errors.js";
export * from "./transport.js";
