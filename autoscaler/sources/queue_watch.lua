-- The queue watcher's probe (queue_watch.py): one LLEN per list key, summed per queue.
-- KEYS: every list key, ARGV[1] consecutive keys per queue (the queue and its priority sub-lists).
-- A key of another type (anyone can write the broker) counts 0: the reading is only ever a hint.
local per = tonumber(ARGV[1])
local sums = {}
local sum = 0
for i, key in ipairs(KEYS) do
  local n = redis.pcall('LLEN', key)
  if type(n) == 'number' then
    sum = sum + n
  end
  if i % per == 0 then
    sums[#sums + 1] = sum
    sum = 0
  end
end
return sums
