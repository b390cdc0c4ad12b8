-- spitwall: move one reputation (a spam score in [0, 1]) towards an observation.
-- The stored score decays by half every half_life seconds, so old evidence fades:
--   s_now = s * 0.5 ^ ((now - t) / half_life);  s_new = s_now + alpha * (target - s_now)
-- KEYS[1] = reputation hash (fields s, t, n); one entity, one hash tag.
-- ARGV: now, half_life, target (0 good .. 1 spam), alpha (0..1), ttl
-- Returns the new score as a string.

local now, half = tonumber(ARGV[1]), tonumber(ARGV[2])
local target, alpha, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local v = redis.call('HMGET', KEYS[1], 's', 't')
local s = tonumber(v[1] or '0') or 0
local t = tonumber(v[2] or '0') or 0
if t > 0 and now > t then s = s * math.pow(0.5, (now - t) / half) end
s = s + alpha * (target - s)
if s < 0 then s = 0 elseif s > 1 then s = 1 end
local str = string.format('%.5f', s)
redis.call('HSET', KEYS[1], 's', str, 't', string.format('%.3f', now))
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('EXPIRE', KEYS[1], ttl)
return str
