-- lift: raise the version counter to at least a floor; never lower it.
-- KEYS: 1 version
-- ARGV: 1 floor
-- Returns: the version counter after the call.
-- Used when Redis lost data (restart without persistence, failover to a lagging
-- replica): new changes must get versions above every version a watcher has seen,
-- and XADD with an explicit id must stay above the log's last id.
-- Retry-safe: running it again with the same floor changes nothing.
local current = tonumber(redis.call('GET', KEYS[1]) or 0)
local floor = tonumber(ARGV[1])
if current < floor then
  redis.call('SET', KEYS[1], floor)
  return floor
end
return current
