-- spitwall: count one INVITE for one entity and return what the checks need.
-- One call per entity (source IP, caller, callee); all KEYS of a call share one hash tag,
-- so the script is valid in Redis Cluster. Every key written here has a TTL.
--
-- KEYS: for each rate window i: cur_i, prev_i (sliding-window counter buckets)
--       then, when ARGV has_source = 1: callers_cur, callers_prev, callees_cur, callees_prev
--       (HyperLogLogs), recent (list of recent callees), scan (scanner-hit counter)
-- ARGV: now (seconds, float), n_windows, W_1 .. W_n (seconds),
--       has_source, caller_member, callee_member, distinct_window, recent_max
-- Returns: array of strings: weighted rate per window, then (source only)
--          distinct_callers, distinct_callees, scanner_hits, recent callees (newest first)

local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local out = {}

for i = 1, n do
  local w = tonumber(ARGV[2 + i])
  local cur, prev = KEYS[2 * i - 1], KEYS[2 * i]
  local c = redis.call('INCR', cur)
  if c == 1 then redis.call('EXPIRE', cur, 2 * w) end
  local p = tonumber(redis.call('GET', prev) or '0')
  local elapsed = (now % w) / w
  out[#out + 1] = string.format('%.3f', c + p * (1 - elapsed))
end

local a = 2 + n + 1
if ARGV[a] == '1' then
  local caller, callee = ARGV[a + 1], ARGV[a + 2]
  local dw, recent_max = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local k = 2 * n
  local callers_cur, callers_prev = KEYS[k + 1], KEYS[k + 2]
  local callees_cur, callees_prev = KEYS[k + 3], KEYS[k + 4]
  local recent, scan = KEYS[k + 5], KEYS[k + 6]
  -- HyperLogLogs are at most 12 KB each, whatever an attacker sends.
  if caller ~= '' then
    redis.call('PFADD', callers_cur, caller)
    redis.call('EXPIRE', callers_cur, 2 * dw)
  end
  if callee ~= '' then
    redis.call('PFADD', callees_cur, callee)
    redis.call('EXPIRE', callees_cur, 2 * dw)
    redis.call('LPUSH', recent, callee)
    redis.call('LTRIM', recent, 0, recent_max - 1)
    redis.call('EXPIRE', recent, dw)
  end
  out[#out + 1] = tostring(redis.call('PFCOUNT', callers_cur, callers_prev))
  out[#out + 1] = tostring(redis.call('PFCOUNT', callees_cur, callees_prev))
  out[#out + 1] = redis.call('GET', scan) or '0'
  local items = redis.call('LRANGE', recent, 0, recent_max - 1)
  for j = 1, #items do out[#out + 1] = items[j] end
end
return out
