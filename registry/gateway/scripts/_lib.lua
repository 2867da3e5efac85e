-- Shared helpers. The gateway prepends this file to every write script when it
-- registers it, so each script below is one self-contained EVALSHA body.
--
-- Versioning: every logged change INCRs the version key once and XADDs one
-- entry to the log stream with the id "<version>-0", so the stream ids are the
-- versions and a reader can tell a gap (trimmed log) from a contiguous read.
--
-- Reservations: the jobs hash of a node maps job id -> "<lease deadline>/<lease
-- ms>/<reserved at>" (ms, Redis clock); the leases zset holds "<node>/<job>" by
-- deadline; the job-node hash maps job id -> node id, so a job holds at most one
-- slot in the whole registry. Every path that frees a slot updates all three.

-- Health score in [0, 1]: 1 minus the weighted mean of the six load figures
-- (cpu, gpu, mem, load, heartbeat delay, error rate), rounded to 4 decimals: the formula
-- of registry/health.py (a unit test checks that both agree).
local function health_score(w, m)
  local wsum = w[1] + w[2] + w[3] + w[4] + w[5] + w[6]
  if wsum <= 0 then return 1 end
  local used = 0
  for j = 1, 6 do used = used + w[j] * m[j] end
  local h = 1 - used / wsum
  if h < 0 then h = 0 elseif h > 1 then h = 1 end
  return math.floor(h * 10000 + 0.5) / 10000
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Bumps the version, stamps it on the node hash and logs the node's full state.
local function log_put(ver_key, log_key, maxlen, node_key, node_id)
  local v = redis.call('INCR', ver_key)
  redis.call('HSET', node_key, 'ver', v)
  local fields = redis.call('HGETALL', node_key)
  local cmd = {'XADD', log_key, 'MAXLEN', '~', maxlen, v .. '-0', 'op', 'put', 'id', node_id}
  for i = 1, #fields do cmd[#cmd + 1] = fields[i] end
  redis.call(unpack(cmd))
  return v, fields
end

local function log_del(ver_key, log_key, maxlen, node_id, reason)
  local v = redis.call('INCR', ver_key)
  redis.call('XADD', log_key, 'MAXLEN', '~', maxlen, v .. '-0', 'op', 'del', 'id', node_id,
    'reason', reason)
  return v
end

local function reservation(deadline, lease, reserved_at)
  return deadline .. '/' .. lease .. '/' .. reserved_at
end

-- Splits a reservation value into deadline, lease ms, reserved-at (numbers).
local function parse_reservation(value)
  local d, l, r = string.match(value, '^(%d+)/(%d+)/(%d+)$')
  return tonumber(d), tonumber(l), tonumber(r)
end

-- Frees one reservation; returns 1 if the job held a slot on the node.
local function free_job(jobs_key, leases_key, jobnode_key, node_id, job_id)
  if redis.call('HDEL', jobs_key, job_id) == 0 then return 0 end
  redis.call('ZREM', leases_key, node_id .. '/' .. job_id)
  if redis.call('HGET', jobnode_key, job_id) == node_id then
    redis.call('HDEL', jobnode_key, job_id)
  end
  return 1
end

-- Frees every reservation of a node.
local function drop_jobs(jobs_key, leases_key, jobnode_key, node_id)
  local jobs = redis.call('HKEYS', jobs_key)
  for i = 1, #jobs do free_job(jobs_key, leases_key, jobnode_key, node_id, jobs[i]) end
  return #jobs
end
