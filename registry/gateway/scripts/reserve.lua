-- reserve: take one job slot on a node for a job, or renew that job's lease.
-- KEYS: 1 node hash, 2 jobs hash, 3 version, 4 log, 5 leases zset, 6 job-node hash
-- ARGV: 1 node_id, 2 job_id, 3 lease_ms, 4 log maxlen, 5 replay ('1' or absent)
-- Returns: {outcome, lease deadline ms, detail}:
--   1 reserved (detail: node HGETALL), 2 renewed: the job already held a slot here
--   (detail: node HGETALL), 0 unknown node, 3 node not ONLINE (detail: its status),
--   4 no free slot, 5 the job holds a slot on another node (detail: that node's id).
-- running_jobs ('jobs' field) is always HLEN of the jobs hash, so it counts live
-- reservations and cannot go negative or count a job twice.
-- Replay ('1'): a slot a sidecar granted from its local view while Redis was
-- unreachable, already acknowledged: it is recorded even on a node that is full or no
-- longer ONLINE (bounded overcommit, see docs/reliability.md), never on an unknown node
-- or for a job holding a slot elsewhere.
-- Retry-safe: a repeat finds the job in the jobs hash and only renews the lease.
local node_key, jobs_key, ver_key, log_key, leases_key, jobnode_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local node_id, job_id, lease, maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local replay = ARGV[5] == '1'
local held = redis.call('HGET', jobnode_key, job_id)
if held and held ~= node_id then return {5, 0, held} end
local cur = redis.call('HMGET', node_key, 'status', 'capacity')
if not cur[1] then return {0, 0, {}} end
local now = now_ms()
local deadline = now + lease
local member = node_id .. '/' .. job_id
local existing = redis.call('HGET', jobs_key, job_id)
if existing then
  local _, _, reserved_at = parse_reservation(existing)
  redis.call('HSET', jobs_key, job_id, reservation(deadline, lease, reserved_at))
  redis.call('ZADD', leases_key, deadline, member)
  redis.call('HSET', jobnode_key, job_id, node_id)
  return {2, deadline, redis.call('HGETALL', node_key)}
end
if not replay then
  if cur[1] ~= 'ONLINE' then return {3, 0, cur[1]} end
  if redis.call('HLEN', jobs_key) >= tonumber(cur[2]) then return {4, 0, {}} end
end
redis.call('HSET', jobs_key, job_id, reservation(deadline, lease, now))
redis.call('ZADD', leases_key, deadline, member)
redis.call('HSET', jobnode_key, job_id, node_id)
redis.call('HSET', node_key, 'jobs', redis.call('HLEN', jobs_key))
local _, fields = log_put(ver_key, log_key, maxlen, node_key, node_id)
return {1, deadline, fields}
