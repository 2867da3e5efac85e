-- heartbeat: record liveness, metrics and (optionally) running jobs for one or more
-- nodes in one call.
-- KEYS: 1 version, 2 log, 3 expiry zset, 4 leases zset, 5 job-node hash
-- ARGV: 1 log maxlen, 2 metrics epsilon, 3-8 health weights (cpu, gpu, mem, load,
--       heartbeat delay, error rate), 9 reconciliation grace ms, 10 key prefix ("{ns}:"),
--       11 lease ms of an adopted job, 12 stretch (>= 1: the sidecar, saturated, asked
--       nodes to beat that many times less often, so the deadline and the expected
--       interval stretch by it), then one packed string per heartbeat: "node_id|cpu|gpu|mem|load|error_rate|jobs"
--       with jobs "-" when the node reports none, else "+" then comma-separated job ids.
--       (One argument per heartbeat keeps the client's encoding cost per batch low; ids
--       cannot contain "|" or ",".) Node and jobs keys are built from the prefix: they
--       carry the same hash tag as KEYS, so the script stays within one cluster slot.
-- Returns: one {outcome, node version, status, deadline_ms, changed, ttl_ms,
--          {released job ids}} per heartbeat; outcome 1 = recorded, 0 = unknown node,
--          2 = node is OFFLINE (it must register again).
--
-- Heartbeat delay: how late this heartbeat came against the interval (stretch * ttl / 3),
-- as a fraction of the interval, capped at 1. Health: 1 minus the weighted mean of
-- cpu, gpu, mem, load, delay and error rate (the formula of registry/health.py).
-- Only a material change is logged: a metric (delay included) moving by at least
-- epsilon since the last logged value, or a reconciliation that freed slots.
-- Otherwise only the deadline and hb_at move, so liveness-only heartbeats do not
-- flood the log.
-- Reconciliation (jobs reported): the node is the ground truth. Reservations it
-- runs get their lease renewed; reservations it does not run are freed once they
-- are older than the grace period (a job reserved a moment ago may not have
-- reached the node yet). Jobs the node runs without a reservation are ignored, except
-- while the node's 'adopt_until' (set by register.lua after Redis lost its data) lies
-- ahead: then each is given a reservation again, if it holds none elsewhere and the
-- node has a free slot, so the slots a data loss erased come back from the nodes.
-- Retry-safe: a repeated heartbeat finds its metrics already stored (no change,
-- nothing logged), renews the same leases, and finds nothing more to free.
local ver_key, log_key, expiry_key, leases_key, jobnode_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local maxlen, eps = ARGV[1], tonumber(ARGV[2])
local w = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]),
  tonumber(ARGV[7]), tonumber(ARGV[8])}
local grace = tonumber(ARGV[9])
local prefix = ARGV[10]
local adopt_lease = tonumber(ARGV[11])
local stretch = tonumber(ARGV[12])
local now = now_ms()
local names = {'cpu', 'gpu', 'mem', 'load', 'delay', 'err'}
local out = {}

local function health_of(m)
  return health_score(w, m)
end

local function reconcile(node_id, jobs_key, report, adopt, capacity)
  local running, order = {}, {}
  for job in string.gmatch(string.sub(report, 2), '[^,]+') do
    running[job] = true
    order[#order + 1] = job
  end
  local released = {}
  local held = redis.call('HGETALL', jobs_key)
  for k = 1, #held, 2 do
    local job_id = held[k]
    local _, lease, reserved_at = parse_reservation(held[k + 1])
    if running[job_id] then
      redis.call('HSET', jobs_key, job_id, reservation(now + lease, lease, reserved_at))
      redis.call('ZADD', leases_key, now + lease, node_id .. '/' .. job_id)
    elseif now - reserved_at >= grace then
      free_job(jobs_key, leases_key, jobnode_key, node_id, job_id)
      released[#released + 1] = job_id
    end
  end
  local adopted = 0
  if adopt then
    for _, job_id in ipairs(order) do
      if redis.call('HLEN', jobs_key) >= capacity then break end
      if not redis.call('HGET', jobnode_key, job_id) then
        redis.call('HSET', jobs_key, job_id, reservation(now + adopt_lease, adopt_lease, now))
        redis.call('ZADD', leases_key, now + adopt_lease, node_id .. '/' .. job_id)
        redis.call('HSET', jobnode_key, job_id, node_id)
        adopted = adopted + 1
      end
    end
  end
  return released, adopted
end

for i = 13, #ARGV do
  local node_id, cpu, gpu, mem, load, err, report = string.match(ARGV[i],
    '^([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)|(.*)$')
  local node_key, jobs_key = prefix .. 'node:' .. node_id, prefix .. 'jobs:' .. node_id
  local cur = redis.call('HMGET', node_key, 'status', 'ttl', 'ver', 'hb_at',
    'cpu', 'gpu', 'mem', 'load', 'delay', 'err', 'adopt_until', 'capacity')
  if not cur[1] then
    out[#out + 1] = {0, 0, '', 0, 0, 0, {}}
  elseif cur[1] == 'OFFLINE' then
    out[#out + 1] = {2, tonumber(cur[3]), 'OFFLINE', 0, 0, tonumber(cur[2]), {}}
  else
    local ttl = tonumber(cur[2])
    local interval = stretch * ttl / 3
    local late = now - tonumber(cur[4]) - interval
    local delay = 0
    if late > 0 then delay = math.min(math.floor(late / interval * 1000 + 0.5) / 1000, 1) end
    local m = {tonumber(cpu), tonumber(gpu), tonumber(mem), tonumber(load), delay,
      tonumber(err)}
    local deadline = now + math.floor(stretch * ttl)
    redis.call('ZADD', expiry_key, deadline, node_id)
    local material = false
    for j = 1, 6 do
      if math.abs(m[j] - tonumber(cur[4 + j] or 0)) >= eps then material = true end
    end
    local released = {}
    if string.sub(report, 1, 1) == '+' then
      local adopt = cur[11] and tonumber(cur[11]) > now
      local adopted
      released, adopted = reconcile(node_id, jobs_key, report, adopt, tonumber(cur[12]))
      if #released > 0 or adopted > 0 then
        redis.call('HSET', node_key, 'jobs', redis.call('HLEN', jobs_key))
        material = true
      end
    end
    local ver = tonumber(cur[3])
    if material then
      redis.call('HSET', node_key, 'hb_at', now, 'cpu', m[1], 'gpu', m[2], 'mem', m[3],
        'load', m[4], 'delay', m[5], 'err', m[6], 'health', health_of(m))
      ver = log_put(ver_key, log_key, maxlen, node_key, node_id)
    else
      redis.call('HSET', node_key, 'hb_at', now)
    end
    out[#out + 1] = {1, ver, cur[1], deadline, material and 1 or 0, ttl, released}
  end
end
return out
