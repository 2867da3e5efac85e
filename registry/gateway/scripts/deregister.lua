-- deregister: remove a node and free its reservations.
-- KEYS: 1 node hash, 2 jobs hash, 3 node-id set, 4 version, 5 log, 6 expiry zset,
--       7 leases zset, 8 job-node hash
-- ARGV: 1 node_id, 2 log maxlen
-- Returns: {existed (0|1), version}: the version of the delete, or the current one.
-- Retry-safe: the second run finds no node and changes nothing.
local node_key, jobs_key, ids_key, ver_key, log_key, expiry_key, leases_key, jobnode_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local node_id, maxlen = ARGV[1], ARGV[2]
if redis.call('EXISTS', node_key) == 0 then
  return {0, tonumber(redis.call('GET', ver_key) or 0)}
end
drop_jobs(jobs_key, leases_key, jobnode_key, node_id)
redis.call('DEL', node_key)
redis.call('SREM', ids_key, node_id)
redis.call('ZREM', expiry_key, node_id)
return {1, log_del(ver_key, log_key, maxlen, node_id, 'deregister')}
