-- expire: mark nodes past their deadline OFFLINE, remove nodes OFFLINE for longer
-- than the grace period, and free reservations whose lease ran out.
-- KEYS: 1 version, 2 log, 3 expiry zset, 4 leases zset, 5 node-id set, 6 job-node hash,
--       7 last-run time (string)
-- ARGV: 1 key prefix ("{ns}:"), 2 log maxlen, 3 offline grace ms, 4 batch size,
--       5 pause ms: a gap since the last run (by any sidecar) longer than this means
--       no sidecar could reach Redis
-- Self-preservation: after such a gap (Redis down, or every sidecar cut off), nodes
-- could not have heartbeated and schedulers could not renew leases, so every deadline
-- and lease is moved forward by the gap and nothing expires in that run. Without it,
-- the whole fleet would expire at once when Redis returns.
-- Node and jobs keys are built from the prefix: they carry the same hash tag as
-- KEYS, so the script stays within one cluster slot.
-- Returns: {nodes marked offline, nodes removed, leases freed, ms deadlines moved by}
-- Safe to run from every sidecar at once and to retry: each item is acted on only
-- while it is still due, and acting on it makes it no longer due (an OFFLINE node's
-- deadline moves to now + grace; a freed lease leaves the zset).
local ver_key, log_key, expiry_key, leases_key, ids_key, jobnode_key, run_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local prefix, maxlen, grace, batch = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local pause = tonumber(ARGV[5])
local now = now_ms()
local last = tonumber(redis.call('GET', run_key) or 0)
redis.call('SET', run_key, now)
if last > 0 and now - last > pause then
  local gap = now - last
  for _, zkey in ipairs({expiry_key, leases_key}) do
    local entries = redis.call('ZRANGE', zkey, 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      redis.call('ZADD', zkey, tonumber(entries[i + 1]) + gap, entries[i])
    end
  end
  return {0, 0, 0, gap}
end
local offline, removed, freed = 0, 0, 0
local due = redis.call('ZRANGEBYSCORE', expiry_key, '-inf', now, 'LIMIT', 0, batch)
for i = 1, #due do
  local node_id = due[i]
  local node_key = prefix .. 'node:' .. node_id
  local jobs_key = prefix .. 'jobs:' .. node_id
  local status = redis.call('HGET', node_key, 'status')
  if not status then
    redis.call('ZREM', expiry_key, node_id)
  elseif status ~= 'OFFLINE' then
    drop_jobs(jobs_key, leases_key, jobnode_key, node_id)
    redis.call('HSET', node_key, 'status', 'OFFLINE', 'off_at', now, 'jobs', 0)
    redis.call('ZADD', expiry_key, now + grace, node_id)
    log_put(ver_key, log_key, maxlen, node_key, node_id)
    offline = offline + 1
  else
    drop_jobs(jobs_key, leases_key, jobnode_key, node_id)
    redis.call('DEL', node_key)
    redis.call('SREM', ids_key, node_id)
    redis.call('ZREM', expiry_key, node_id)
    log_del(ver_key, log_key, maxlen, node_id, 'expired')
    removed = removed + 1
  end
end
local leases = redis.call('ZRANGEBYSCORE', leases_key, '-inf', now, 'LIMIT', 0, batch)
for i = 1, #leases do
  local member = leases[i]
  local cut = string.find(member, '/', 1, true)
  local node_id, job_id = string.sub(member, 1, cut - 1), string.sub(member, cut + 1)
  local node_key = prefix .. 'node:' .. node_id
  local jobs_key = prefix .. 'jobs:' .. node_id
  redis.call('ZREM', leases_key, member)
  if free_job(jobs_key, leases_key, jobnode_key, node_id, job_id) == 1 then
    freed = freed + 1
    if redis.call('EXISTS', node_key) == 1 then
      redis.call('HSET', node_key, 'jobs', redis.call('HLEN', jobs_key))
      log_put(ver_key, log_key, maxlen, node_key, node_id)
    end
  end
end
return {offline, removed, freed, 0}
