-- An MCP client's traffic (streamable HTTP): POST /mcp with a JSON-RPC tools/call of
-- 200-2,000 bytes, its own id each time, one of 16 Mcp-Session-Id values, the Accept and
-- Content-Type the SDK clients send. nginx answers SSE-framed (bench/nginx.conf). Every
-- head differs (the Content-Length and session change, the id counts up in the body).
local n = 0
local sizes = {}
math.randomseed(29)
for i = 1, 64 do sizes[i] = math.random(200, 2000) end
request = function()
  n = n + 1
  local size = sizes[(n % 64) + 1]
  local prefix = '{"jsonrpc":"2.0","id":' .. n ..
    ',"method":"tools/call","params":{"name":"echo","arguments":{"text":"'
  local suffix = '"}}}'
  local body = prefix .. string.rep("x", size - #prefix - #suffix) .. suffix
  local headers = {
    ["Content-Type"] = "application/json",
    ["Accept"] = "application/json, text/event-stream",
    ["Mcp-Session-Id"] = string.format("bench-session-%02d", n % 16),
    ["Mcp-Protocol-Version"] = "2025-06-18",
  }
  return wrk.format("POST", "/mcp", headers, body)
end
