-- Once per tick, for the dashboards and alerts (never for a decision): the broker's INFO memory, and per
-- queue the task-count and worker-heartbeat hashes that autoscaler.celery's worker helper writes.
-- Loaded and called by autoscaler/sources/broker_stats.py; read-only.
--
-- KEYS             per queue: its task-count hash, then its worker-heartbeat hash
-- ARGV[1]          most fields a hash may have to be read
-- ARGV[2]          most bytes a hash may take (MEMORY USAGE, every field counted) to be read
-- ARGV[3]          most bytes of the INFO memory answer returned
--
-- Returns {info_memory_prefix, then per key: {"ok", field, value, ...} or {problem, key, detail}}
--   problem          "wrongtype" (detail: the key's type), "toomany" (detail: its field count), "toolarge"
--                    (detail: its bytes), "unmeasured" (detail: why MEMORY USAGE refused)
-- Any broker client can write these keys: a key too big or of the wrong type is refused, alone.

local max_fields = tonumber(ARGV[1])
local max_bytes = tonumber(ARGV[2])
local info_bytes = tonumber(ARGV[3])

local function read_hash(key)
    local n = redis.pcall('HLEN', key)
    if type(n) ~= 'number' then
        local t = redis.call('TYPE', key)
        return {'wrongtype', key, t['ok'] or tostring(t)}
    end
    if n == 0 then
        return {'ok'}
    end
    if n > max_fields then
        return {'toomany', key, n}
    end
    local m = redis.pcall('MEMORY', 'USAGE', key, 'SAMPLES', '0')
    if type(m) ~= 'number' then
        return {'unmeasured', key, type(m) == 'table' and (m['err'] or 'refused') or 'no answer'}
    end
    if m > max_bytes then
        return {'toolarge', key, m}
    end
    local all = redis.call('HGETALL', key)
    table.insert(all, 1, 'ok')
    return all
end

local info = redis.pcall('INFO', 'memory')
if type(info) ~= 'string' then
    info = ''
end
local out = {string.sub(info, 1, info_bytes)}
for i = 1, #KEYS do
    out[i + 1] = read_hash(KEYS[i])
end
return out
