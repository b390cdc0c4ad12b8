-- spitwall: keep a decision retrievable by Call-ID in a bounded ring of hash buckets.
-- The ring holds between (n_buckets - 1) * bucket_size and n_buckets * bucket_size
-- decisions: the bucket about to be reused is cleared first. All keys share the {dec} tag.
--
-- KEYS: seq, bucket_0 .. bucket_{n-1}
-- ARGV: call_id, record (msgpack), bucket_size, ttl_seconds
-- Returns: the sequence number of this decision.

local seq = redis.call('INCR', KEYS[1])
local size = tonumber(ARGV[3])
local n = #KEYS - 1
local slot = math.floor((seq - 1) / size) % n
local bucket = KEYS[2 + slot]
if (seq - 1) % size == 0 then redis.call('DEL', bucket) end
redis.call('HSET', bucket, ARGV[1], ARGV[2])
redis.call('EXPIRE', bucket, tonumber(ARGV[4]))
return seq
