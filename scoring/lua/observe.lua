-- spitwall: count one INVITE for one entity and return what the checks need.
-- One call per entity (source IP, caller, callee); all KEYS of a call share one hash tag,
-- so the script is valid in Redis Cluster. Every key written here has a TTL.
--
-- ARGV[1] = mode: 'ip' | 'caller' | 'callee'; ARGV[2] = now (seconds, float);
-- ARGV[3] = n (rate windows); ARGV[4 .. 3+n] = window lengths (seconds).
-- KEYS[1 .. 2n] = for each window: current bucket, previous bucket (sliding-window counter).
--
-- mode 'ip':     KEYS += callers_cur, callers_prev, callees_cur, callees_prev (HyperLogLogs),
--                        recent (list of recent callees), scan (scanner probes), rep (hash)
--                ARGV += caller_member, callee_member, distinct_window, recent_max
--                returns rates.., distinct_callers, distinct_callees, scanner_hits,
--                        rep_score, rep_time, recent callees.. (newest first)
-- mode 'caller': KEYS += rep;      returns rates.., rep_score, rep_time
-- mode 'callee': returns rates.. (who called last, for in-call spam reports, is a plain SET
--                in the same write: its key is named by the callee's user alone, another slot)
-- All values are returned as strings.

local mode = ARGV[1]
local now = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local out = {}

for i = 1, n do
  local w = tonumber(ARGV[3 + i])
  local cur, prev = KEYS[2 * i - 1], KEYS[2 * i]
  local c = redis.call('INCR', cur)
  if c == 1 then redis.call('EXPIRE', cur, 2 * w) end
  local p = tonumber(redis.call('GET', prev) or '0')
  local elapsed = (now % w) / w
  out[#out + 1] = string.format('%.3f', c + p * (1 - elapsed))
end

local k = 2 * n
local a = 3 + n

local function reputation(key)
  local v = redis.call('HMGET', key, 's', 't')
  out[#out + 1] = v[1] or '0'
  out[#out + 1] = v[2] or '0'
end

if mode == 'ip' then
  local caller, callee = ARGV[a + 1], ARGV[a + 2]
  local dw, recent_max = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local callers_cur, callers_prev = KEYS[k + 1], KEYS[k + 2]
  local callees_cur, callees_prev = KEYS[k + 3], KEYS[k + 4]
  local recent, scan, rep = KEYS[k + 5], KEYS[k + 6], KEYS[k + 7]
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
  -- One-key PFCOUNTs use the HyperLogLog's cached cardinality (a two-key PFCOUNT merges the
  -- sketches on every call, which cost more Redis CPU than everything else per INVITE).
  -- The larger of the current and the previous window approximates the sliding window.
  out[#out + 1] = tostring(math.max(redis.call('PFCOUNT', callers_cur),
                                    redis.call('PFCOUNT', callers_prev)))
  out[#out + 1] = tostring(math.max(redis.call('PFCOUNT', callees_cur),
                                    redis.call('PFCOUNT', callees_prev)))
  out[#out + 1] = redis.call('GET', scan) or '0'
  reputation(rep)
  local items = redis.call('LRANGE', recent, 0, recent_max - 1)
  for j = 1, #items do out[#out + 1] = items[j] end
elseif mode == 'caller' then
  reputation(KEYS[k + 1])
end
return out
