-- reserve: take one job slot on a node for a job, or renew that job's lease.
-- KEYS: 1 node hash, 2 jobs hash, 3 version, 4 log, 5 leases zset
-- ARGV: 1 node_id, 2 job_id, 3 lease_ms, 4 log maxlen
-- Returns: {outcome, lease deadline ms, flat HGETALL or status}:
--   1 reserved, 2 renewed (the job already held a slot here), 0 unknown node,
--   3 node not ONLINE (third element is its status), 4 no free slot.
-- running_jobs ('jobs' field) is always HLEN of the jobs hash, so it counts live
-- reservations and cannot go negative or count a job twice.
-- Retry-safe: a repeat finds the job in the jobs hash and only renews the lease.
local node_key, jobs_key, ver_key, log_key, leases_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local node_id, job_id, lease, maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local cur = redis.call('HMGET', node_key, 'status', 'capacity')
if not cur[1] then return {0, 0, {}} end
local deadline = now_ms() + lease
local member = node_id .. '/' .. job_id
if redis.call('HEXISTS', jobs_key, job_id) == 1 then
  redis.call('HSET', jobs_key, job_id, deadline)
  redis.call('ZADD', leases_key, deadline, member)
  return {2, deadline, redis.call('HGETALL', node_key)}
end
if cur[1] ~= 'ONLINE' then return {3, 0, cur[1]} end
if redis.call('HLEN', jobs_key) >= tonumber(cur[2]) then return {4, 0, {}} end
redis.call('HSET', jobs_key, job_id, deadline)
redis.call('ZADD', leases_key, deadline, member)
redis.call('HSET', node_key, 'jobs', redis.call('HLEN', jobs_key))
local _, fields = log_put(ver_key, log_key, maxlen, node_key, node_id)
return {1, deadline, fields}
