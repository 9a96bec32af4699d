// mailauth 4.x ships no type declarations; only what the edge calls is declared.
declare module "mailauth" {
  export function authenticate(
    message: NodeJS.ReadableStream | Buffer | string,
    options: Record<string, unknown>,
  ): Promise<unknown>;
}
