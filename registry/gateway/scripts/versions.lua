-- versions: the registry version, then the version of each given node, in one reply.
-- Read-only. It replaces a pipeline of one HGET per node: the reply is one array, so
-- the sidecar parses one reply instead of hundreds (revalidation asks for thousands of
-- nodes a second at 10,000 nodes).
-- KEYS: 1 version
-- ARGV: 1 key prefix ("{ns}:"), then node ids. Node keys are built from the prefix: they
--       carry the same hash tag as KEYS, so the script stays within one cluster slot.
-- Returns: {registry version, v1, v2, ...} with each v the node's 'ver' field, or -1 when
--          the node is gone.
-- Retry-safe: it writes nothing.
local prefix = ARGV[1]
local out = {tonumber(redis.call('GET', KEYS[1]) or 0)}
for i = 2, #ARGV do
  local v = redis.call('HGET', prefix .. 'node:' .. ARGV[i], 'ver')
  out[#out + 1] = v and tonumber(v) or -1
end
return out
