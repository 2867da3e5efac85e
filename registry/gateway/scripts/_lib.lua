-- Shared helpers. The gateway prepends this file to every write script when it
-- registers it, so each script below is one self-contained EVALSHA body.
--
-- Versioning: every logged change INCRs the version key once and XADDs one
-- entry to the log stream with the id "<version>-0", so the stream ids are the
-- versions and a reader can tell a gap (trimmed log) from a contiguous read.

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

-- Frees every reservation of a node (its jobs hash and its lease entries).
local function drop_jobs(jobs_key, leases_key, node_id)
  local jobs = redis.call('HKEYS', jobs_key)
  for i = 1, #jobs do redis.call('ZREM', leases_key, node_id .. '/' .. jobs[i]) end
  redis.call('DEL', jobs_key)
  return #jobs
end
