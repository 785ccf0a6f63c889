-- One tick's read of every Celery queue on kombu's Redis transport, in one round trip.
-- Loaded and called by autoscaler/sources/celery_redis.py; read-only; never returns message bodies.
--
-- KEYS[1]          the unacked hash (kombu `unacked_key`, global key prefix applied)
-- KEYS[2..]        per queue, ARGV[1] list keys (bare queue key and priority sub-lists), queue after queue
-- ARGV[1]          list keys per queue (the number of priority steps)
-- ARGV[2]          most unacked entries to read; a larger hash is sampled with HSCAN
-- ARGV[3]          the publish-stamp header name, JSON-quoted: "x-autoscaler-published-at"
-- ARGV[4]          most bytes of unacked entries to read per call (entries are whole messages: a hash of
--                  2,000 x 100 KB once made one call copy 200 MB and block Redis for a second)
-- ARGV[5..]        per queue, its name JSON-escaped without the quotes (how kombu writes a routing key)
--
-- Returns {"ok", hlen, read, unparsed, then per queue: waiting, unacked_in_read, oldest_stamp}
--   oldest_stamp is the stamp's JSON text, or false (nil) when the queue is empty or its oldest
--   message is unstamped (the caller tells these apart by waiting == 0).
-- Or {"wrongtype", key, actual_type, expected_type} when a key holds the wrong Redis type.

local steps = tonumber(ARGV[1])
local sample = tonumber(ARGV[2])
local needle = ARGV[3]
local byte_budget = tonumber(ARGV[4])
local FIRST_NAME = 5
local nqueues = (#KEYS - 1) / steps

local function wrongtype(key, expected)
    local t = redis.call('TYPE', key)
    return {'wrongtype', key, t['ok'] or tostring(t), expected}
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

-- Waiting, and the oldest stamp, over one queue's lists. kombu LPUSHes and consumers BRPOP, so each
-- list's oldest message is at index -1. One unstamped oldest message makes the queue's age unknown:
-- it may be older than every stamped one.
local function read_queue(first)
    local waiting, oldest, oldest_text, unknown = 0, nil, false, false
    for j = first, first + steps - 1 do
        local key = KEYS[j]
        local n = redis.pcall('LLEN', key)
        if type(n) == 'table' then
            return nil, wrongtype(key, 'list')
        end
        if n > 0 then
            waiting = waiting + n
            local text = stamp_of(redis.call('LINDEX', key, -1))
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
    return {waiting, oldest_text}
end

local out = {'ok', 0, 0, 0}
local slot = {}  -- escaped routing key -> index in `out` of that queue's unacked count
for q = 0, nqueues - 1 do
    local stats, err = read_queue(2 + q * steps)
    if err then
        return err
    end
    local base = 5 + q * 3
    out[base] = stats[1]
    out[base + 1] = 0
    out[base + 2] = stats[2]
    slot[ARGV[FIRST_NAME + q]] = base + 1
end

local hkey = KEYS[1]
local hlen = redis.pcall('HLEN', hkey)
if type(hlen) == 'table' then
    return wrongtype(hkey, 'hash')
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

-- Which entries to look at: all of a small hash, else a random sample of field names (HRANDFIELD, Redis
-- 6.2+; names only, no values copied). Each entry's size is asked first (HSTRLEN) and its value read only
-- while the byte budget lasts, so the work per call is bounded by entries and by bytes; the caller scales
-- the counts of what was read up to the whole hash.
local fields
if hlen <= sample then
    fields = redis.call('HKEYS', hkey)
else
    local picked = redis.pcall('HRANDFIELD', hkey, sample)
    if type(picked) == 'table' and picked['err'] == nil then
        fields = picked
    else
        -- Before Redis 6.2: one HSCAN page of names (its values are copied too, but only one page).
        local page = redis.call('HSCAN', hkey, '0', 'COUNT', sample)
        fields = {}
        for i = 1, #page[2], 2 do
            fields[#fields + 1] = page[2][i]
        end
    end
end
local spent = 0
for i = 1, #fields do
    if read >= sample then
        break
    end
    local size = redis.call('HSTRLEN', hkey, fields[i])
    if spent + size <= byte_budget then
        local value = redis.call('HGET', hkey, fields[i])
        if value then
            spent = spent + size
            tally(value)
        end
    end
end

out[2], out[3], out[4] = hlen, read, unparsed
return out
