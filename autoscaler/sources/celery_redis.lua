-- One tick's read of every Celery queue on kombu's Redis transport, in one round trip.
-- Loaded and called by autoscaler/sources/celery_redis.py; read-only; never returns message bodies.
--
-- KEYS[1]          the unacked hash (kombu `unacked_key`, global key prefix applied)
-- KEYS[2..]        per queue, ARGV[1] list keys (bare queue key and priority sub-lists), queue after queue
-- ARGV[1]          list keys per queue (the number of priority steps)
-- ARGV[2]          most unacked entries to read; a larger hash is sampled
-- ARGV[3]          the publish-stamp header name, JSON-quoted: "x-autoscaler-published-at"
-- ARGV[4]          most bytes of unacked entries (field names and values) to copy per call
-- ARGV[5]          a list's oldest message is copied (for its stamp) only if the whole list takes at most
-- ARGV[6]          this many bytes, or at most this many bytes per message on average (see oldest_fits)
-- ARGV[7..]        per queue, its name JSON-escaped without the quotes (how kombu writes a routing key)
--
-- Returns {"ok", hlen, read, unparsed, copied, unacked_problem, then per queue: waiting, unacked_in_read,
--          oldest_stamp, problem}
--   copied           bytes of list messages, field names and values copied into the script
--   oldest_stamp     the stamp's JSON text, or false (nil) when the queue is empty, its oldest message is
--                    unstamped, or it was not read (then `problem` says why)
--   a problem        false, or {"wrongtype", key, actual_type}: the queue (or unacked) cannot be read;
--                    {"toolarge", key, bytes, entries}: not copied (latency, or unacked, unknown);
--                    {"unmeasured", key, error}: MEMORY USAGE refused, so the size could not be bounded.
-- One wrong-typed key never fails the whole read: it makes only its own queue (or `unacked`) unknown.
-- The type is checked by the first command on each key, through redis.pcall (LLEN, HLEN): that costs no
-- extra command on the usual path (a TYPE per key would add one per list per tick); TYPE runs only after
-- a refusal, to name the type.

local steps = tonumber(ARGV[1])
local sample = tonumber(ARGV[2])
local needle = ARGV[3]
local byte_budget = tonumber(ARGV[4])
local list_bytes = tonumber(ARGV[5])
local entry_bytes = tonumber(ARGV[6])
local FIRST_NAME = 7
local nqueues = (#KEYS - 1) / steps
local copied = 0

local function type_of(key)
    local t = redis.call('TYPE', key)
    return t['ok'] or tostring(t)
end

-- Bytes the key takes, every element counted (SAMPLES 0), or nil and the refusal (a renamed MEMORY
-- command on some hosted Redis). For a list this walks every quicklist node from the head: O(nodes),
-- about 1.5 ms per GB of list (measured on Redis 7.0), and the tail node (the oldest message) is
-- included, which the default 5-node sample from the head is not.
local function memory(key, samples)
    local m = redis.pcall('MEMORY', 'USAGE', key, 'SAMPLES', samples)
    if type(m) == 'number' then
        return m
    end
    return nil, type(m) == 'table' and (m['err'] or 'refused') or 'no answer'
end

-- No Redis command gives one list element's size without copying it, so the guard is the list's own
-- size, exact: the oldest message is at most the whole list. It is copied when the list is small in all
-- (a proven bound: list_bytes), or small per message on average (entry_bytes): a message of X bytes is
-- then copied only while at least X / entry_bytes messages wait behind it in the same list. The four
-- 85 MB and three 300 MB messages of issue 17 fail both tests and are never copied.
local function oldest_fits(key, n)
    local m, err = memory(key, '0')
    if m == nil then
        return false, {'unmeasured', key, err}
    end
    if m <= list_bytes or m <= entry_bytes * n then
        return true
    end
    return false, {'toolarge', key, m, n}
end

-- The stamp of a raw kombu message as JSON number text, or nil. A plain find is cheap and exact: the
-- needle ends in an unescaped quote, which cannot occur inside a JSON string (so not inside the
-- base64 body, argsrepr or a utf-8 body); a backslash before it would mean a longer key ending so.
local function stamp_of(raw)
    local from = 1
    while true do
        local s, e = string.find(raw, needle, from, true)
        if not s then
            return nil
        end
        if s == 1 or string.byte(raw, s - 1) ~= 92 then
            local text = string.match(raw, '^%s*:%s*(%-?[%d%.][%d%.eE%+%-]*)', e + 1)
            if text and tonumber(text) then
                return text
            end
        end
        from = e + 1
    end
end

-- Waiting, the oldest stamp and a problem (or false), over one queue's lists. kombu LPUSHes and consumers
-- BRPOP, so each list's oldest message is at index -1. One unstamped or unread oldest message makes the
-- queue's age unknown: it may be older than every stamped one. A wrong-typed list makes the whole queue
-- unreadable (its count would be wrong); the first one found is named.
local function read_queue(first)
    local waiting, oldest, oldest_text, unknown, problem = 0, nil, false, false, false
    for j = first, first + steps - 1 do
        local key = KEYS[j]
        local n = redis.pcall('LLEN', key)
        if type(n) ~= 'number' then
            return {0, false, {'wrongtype', key, type_of(key)}}
        end
        if n > 0 then
            waiting = waiting + n
            local fits, why = oldest_fits(key, n)
            local text
            if fits then
                local raw = redis.call('LINDEX', key, -1)
                copied = copied + #raw
                text = stamp_of(raw)
            elseif not problem then
                problem = why
            end
            local value = text and tonumber(text)
            if not value then
                unknown = true
            elseif oldest == nil or value < oldest then
                oldest, oldest_text = value, text
            end
        end
    end
    if unknown then
        oldest_text = false
    end
    return {waiting, oldest_text, problem}
end

local out = {'ok', 0, 0, 0, 0, false}
local HEADER = 6
local slot = {}  -- escaped routing key -> index in `out` of that queue's unacked count
for q = 0, nqueues - 1 do
    local stats = read_queue(2 + q * steps)
    local base = HEADER + 1 + q * 4
    out[base] = stats[1]
    out[base + 1] = 0
    out[base + 2] = stats[2]
    out[base + 3] = stats[3]
    slot[ARGV[FIRST_NAME + q]] = base + 1
end

local read, unparsed = 0, 0
local tail_len = 8
for q = 0, nqueues - 1 do
    tail_len = math.max(tail_len, #ARGV[FIRST_NAME + q] + 8)
end

-- kombu stores json.dumps([message, exchange, routing_key]): the routing key is the last string of
-- the array. Only the tail is scanned, so a big message costs no more than a small one; the greedy
-- `.*` finds the last unescaped quote before the closing one (quotes inside a JSON string are
-- always escaped). A routing key longer than every asked-for name cannot match and is not garbage.
local function tally(value)
    read = read + 1
    if string.byte(value, 1) ~= 91 then
        unparsed = unparsed + 1
        return
    end
    local tail = string.sub(value, -tail_len)
    if not string.find(tail, '"%s*%]%s*$') then
        unparsed = unparsed + 1
        return
    end
    local rk = string.match(tail, '^.*[^\\]"(.*)"%s*%]%s*$')
    local at = rk and slot[rk]
    if at then
        out[at] = out[at] + 1
    end
end

-- Which entries to look at. Field names are copied before their size is known (no command gives it), so
-- how many are fetched is set from the hash's size per entry (MEMORY USAGE: names and values): exact when
-- the hash has at most `sample` entries (SAMPLES 0 walks them all), so HKEYS runs only when the whole hash
-- fits the byte budget; for a bigger hash the size per entry comes from `sample` entries and the names
-- are a random sample (HRANDFIELD, Redis 6.2+), whose expected size is within the budget. Each value's
-- size is asked first (HSTRLEN) and the value read only while the budget lasts; the caller scales the
-- counts of what was read up to the whole hash. Too big per entry to read even one: unacked is unknown.
local hkey = KEYS[1]
local hlen = redis.pcall('HLEN', hkey)
local fields = {}
if type(hlen) ~= 'number' then
    out[HEADER] = {'wrongtype', hkey, type_of(hkey)}
    hlen = 0
elseif hlen > 0 then
    local m, err = memory(hkey, tostring(hlen <= sample and 0 or sample))
    local want = math.min(hlen, sample)
    if m ~= nil then
        want = math.min(want, math.floor(byte_budget * hlen / math.max(m, 1)))
    end
    if m == nil then
        out[HEADER] = {'unmeasured', hkey, err}
    elseif want < 1 then
        out[HEADER] = {'toolarge', hkey, m, hlen}
    elseif want >= hlen then
        fields = redis.call('HKEYS', hkey)
    else
        local picked = redis.pcall('HRANDFIELD', hkey, want)
        if type(picked) == 'table' and picked['err'] == nil then
            fields = picked
        else
            -- Before Redis 6.2: one HSCAN page (values copied too, but only about `want` of them).
            local page = redis.call('HSCAN', hkey, '0', 'COUNT', want)
            for i = 1, #page[2], 2 do
                fields[#fields + 1] = page[2][i]
                copied = copied + #page[2][i + 1]
            end
        end
    end
end
local spent = 0
for i = 1, #fields do
    spent = spent + #fields[i]
    copied = copied + #fields[i]
end
for i = 1, #fields do
    if read >= sample then
        break
    end
    local size = redis.call('HSTRLEN', hkey, fields[i])
    if spent + size <= byte_budget then
        local value = redis.call('HGET', hkey, fields[i])
        if value then
            spent = spent + size
            copied = copied + size
            tally(value)
        end
    end
end
if hlen > 0 and read == 0 and not out[HEADER] then
    -- Names alone used the budget: nothing to scale up from.
    out[HEADER] = {'toolarge', hkey, spent, hlen}
end

out[2], out[3], out[4], out[5] = hlen, read, unparsed, copied
return out
