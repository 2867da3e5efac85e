-- put_pool: create or replace a pool's configuration.
-- KEYS: 1 pool hash, 2 pool-id set, 3 version, 4 log
-- ARGV: 1 pool_id, 2 spec JSON (canonical), 3 log maxlen
-- Returns: {changed (0|1), flat HGETALL of the pool hash (spec, ver)}
-- Retry-safe: the second run finds the same spec and changes nothing.
local pool_key, ids_key, ver_key, log_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local pool_id, spec, maxlen = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', pool_key, 'spec') == spec then
  return {0, redis.call('HGETALL', pool_key)}
end
local v = redis.call('INCR', ver_key)
redis.call('HSET', pool_key, 'spec', spec, 'ver', v)
redis.call('SADD', ids_key, pool_id)
redis.call('XADD', log_key, 'MAXLEN', '~', maxlen, v .. '-0', 'op', 'pool', 'id', pool_id,
  'spec', spec, 'ver', v)
return {1, redis.call('HGETALL', pool_key)}
