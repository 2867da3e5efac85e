-- release: free a job's slot on a node.
-- KEYS: 1 node hash, 2 jobs hash, 3 version, 4 log, 5 leases zset, 6 job-node hash
-- ARGV: 1 node_id, 2 job_id, 3 log maxlen
-- Returns: {released (0|1), flat HGETALL of the node (empty if it is gone)}
-- Retry-safe: the second run finds no such job and changes nothing.
local node_key, jobs_key, ver_key, log_key, leases_key, jobnode_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local node_id, job_id, maxlen = ARGV[1], ARGV[2], ARGV[3]
if free_job(jobs_key, leases_key, jobnode_key, node_id, job_id) == 0 then
  return {0, redis.call('HGETALL', node_key)}
end
if redis.call('EXISTS', node_key) == 0 then return {1, {}} end
redis.call('HSET', node_key, 'jobs', redis.call('HLEN', jobs_key))
local _, fields = log_put(ver_key, log_key, maxlen, node_key, node_id)
return {1, fields}
