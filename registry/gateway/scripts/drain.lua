-- drain: stop new reservations on a node; it stays visible and keeps its jobs.
-- KEYS: 1 node hash, 2 version, 3 log
-- ARGV: 1 node_id, 2 log maxlen
-- Returns: {outcome, flat HGETALL}: 1 drained now, 2 already draining or offline
--          (unchanged), 0 unknown node (empty list).
-- Retry-safe: the second run finds the node DRAINING and changes nothing.
local node_key, ver_key, log_key = KEYS[1], KEYS[2], KEYS[3]
local node_id, maxlen = ARGV[1], ARGV[2]
local status = redis.call('HGET', node_key, 'status')
if not status then return {0, {}} end
if status ~= 'ONLINE' then return {2, redis.call('HGETALL', node_key)} end
redis.call('HSET', node_key, 'status', 'DRAINING')
local _, fields = log_put(ver_key, log_key, maxlen, node_key, node_id)
return {1, fields}
