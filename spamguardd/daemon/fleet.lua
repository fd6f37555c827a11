-- spamguardd fleet mode: everything that changes the shared store, each operation atomic.
--
-- One script, loaded once per server (EVALSHA), ARGV[1] naming the operation; every key it
-- touches is passed in KEYS (spamguardd/core/cluster.py names them). Times are seconds since the
-- epoch; the server's clock (TIME) is used unless the caller passes one (the tests do), so every
-- relay counts on one clock.
--
-- A user's counting state is one msgpack array, the same arithmetic as core/buckets.py:
--   {updated, w, count_1, period_1, ..., count_w, period_w, tokens_1, ..., tokens_w,
--    fingerprint, last_1, ..., last_w,   (one group per recent failure, oldest first)
--    ...}
-- It expires with its longest window: by then every bucket is full again and every failure is out
-- of its window, so a missing key and an expired one mean the same thing.
--
-- A block record is "blocked_at=SECONDS " followed by key=value pairs the caller encoded (reason,
-- by, relay), as the block file quotes them.

local NEVER = -1e300
local SLACK = 1e-9

local function clock(given)
  if given ~= nil and given ~= '' then
    return tonumber(given)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function announce(stream, maxlen, ...)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', ...)
end

-- The stored state as (updated, tokens, recents), carried over to the windows asked for now:
-- a window whose period is still there keeps what it has used up, a new one starts full
-- (core/buckets.py remap), and recent failures keep their times in the windows that stay.
local function load(raw, counts, periods, now, limit)
  local st = cmsgpack.unpack(raw)
  local w0 = st[2]
  local old_counts, old_periods, tokens = {}, {}, {}
  for i = 1, w0 do
    old_counts[i] = st[1 + 2 * i]
    old_periods[i] = st[2 + 2 * i]
    tokens[i] = st[2 + 2 * w0 + i]
  end
  local recents = {}
  local width = 1 + w0
  for offset = 3 + 3 * w0, #st, width do
    local entry = {}
    for k = 0, w0 do
      entry[1 + k] = st[offset + k]
    end
    recents[#recents + 1] = entry
  end
  local updated = st[1]
  local same = w0 == #counts
  if same then
    for i = 1, w0 do
      if old_counts[i] ~= counts[i] or old_periods[i] ~= periods[i] then
        same = false
      end
    end
  end
  if same then
    return updated, tokens, recents
  end
  local elapsed = now - updated
  if elapsed > 0 then
    for i = 1, w0 do
      tokens[i] = math.min(old_counts[i], tokens[i] + elapsed * (old_counts[i] / old_periods[i]))
    end
    updated = now
  end
  local by_period = {}
  for i = 1, w0 do
    by_period[old_periods[i]] = i
  end
  local new_tokens = {}
  for i = 1, #counts do
    local old = by_period[periods[i]]
    if old == nil then
      new_tokens[i] = counts[i]
    else
      local used = old_counts[old] - tokens[old]
      new_tokens[i] = math.min(counts[i], math.max(0, counts[i] - used))
    end
  end
  local kept = {}
  for j = math.max(1, #recents - limit + 1), #recents do
    local entry = {recents[j][1]}
    for i = 1, #counts do
      local old = by_period[periods[i]]
      entry[1 + i] = old == nil and NEVER or recents[j][1 + old]
    end
    kept[#kept + 1] = entry
  end
  return updated, new_tokens, kept
end

local function save(key, updated, counts, periods, tokens, recents, ttl_ms)
  local st = {updated, #counts}
  for i = 1, #counts do
    st[#st + 1] = counts[i]
    st[#st + 1] = periods[i]
  end
  for i = 1, #counts do
    st[#st + 1] = tokens[i]
  end
  for _, entry in ipairs(recents) do
    for _, value in ipairs(entry) do
      st[#st + 1] = value
    end
  end
  redis.call('SET', key, cmsgpack.pack(st), 'PX', ttl_ms)
end

-- count: one failed recipient of one user, in every window, de-duplicated.
-- KEYS: counter, blocks, events, would-block mark
-- ARGV: 'count', user, fingerprint, now, mode, relay, origin, limit, maxlen, w,
--       then count, period, record tail for each window
-- Returns {status, counted, tripped window (0: none), record, tokens_1, ..., tokens_w}, status:
--   'blocked'  the user is blocked already (record: the block); nothing was counted
--   'block'    this call emptied a bucket and made the block (record: the block)
--   'would'    monitor mode: this call emptied a bucket, first since the mark expired
--   'counted'  anything else
local function count()
  local user = ARGV[2]
  local existing = redis.call('HGET', KEYS[2], user)
  if existing then
    return {'blocked', 0, 0, existing}
  end
  local fingerprint = tonumber(ARGV[3])
  local now = clock(ARGV[4])
  local mode = ARGV[5]
  local limit = tonumber(ARGV[8])
  local w = tonumber(ARGV[10])
  local counts, periods, tails = {}, {}, {}
  local longest = 0
  for i = 1, w do
    counts[i] = tonumber(ARGV[8 + 3 * i])
    periods[i] = tonumber(ARGV[9 + 3 * i])
    tails[i] = ARGV[10 + 3 * i]
    longest = math.max(longest, periods[i])
  end
  local updated, tokens, recents
  local raw = redis.call('GET', KEYS[1])
  if raw then
    updated, tokens, recents = load(raw, counts, periods, now, limit)
  else
    updated, tokens, recents = now, {}, {}
    for i = 1, w do
      tokens[i] = counts[i]
    end
  end
  -- refill every bucket up to now (a clock that goes back credits nothing)
  local elapsed = now - updated
  if elapsed > 0 then
    for i = 1, w do
      tokens[i] = math.min(counts[i], tokens[i] + elapsed * (counts[i] / periods[i]))
    end
    updated = now
  end
  local previous = nil
  for j = 1, #recents do
    if recents[j][1] == fingerprint then
      previous = recents[j]
      table.remove(recents, j)
      break
    end
  end
  local counted, tripped = 0, 0
  local entry = {fingerprint}
  for i = 1, w do
    local last = previous and previous[1 + i] or NEVER
    if now - last < periods[i] then
      entry[1 + i] = last
    else
      counted = 1
      entry[1 + i] = now
      local level = math.max(0, tokens[i] - 1)
      tokens[i] = level
      if tripped == 0 and level < 1 - SLACK then
        tripped = i
      end
    end
  end
  recents[#recents + 1] = entry
  while #recents > limit do
    table.remove(recents, 1)
  end
  local reply = {'counted', counted, tripped, ''}
  for i = 1, w do
    reply[4 + i] = string.format('%.17g', tokens[i])
  end
  local ttl_ms = math.ceil(longest * 1000)
  if tripped > 0 and mode == 'enforce' then
    local record = 'blocked_at=' .. string.format('%d', math.floor(now)) .. ' ' .. tails[tripped]
    redis.call('HSET', KEYS[2], user, record)
    redis.call('DEL', KEYS[1], KEYS[4])
    announce(KEYS[3], ARGV[9], 'op', 'block', 'user', user, 'record', record,
      'origin', ARGV[7], 'relay', ARGV[6])
    reply[1] = 'block'
    reply[4] = record
    return reply
  end
  save(KEYS[1], updated, counts, periods, tokens, recents, ttl_ms)
  if tripped > 0 and redis.call('SET', KEYS[4], '1', 'NX', 'PX', ttl_ms) then
    reply[1] = 'would'
  end
  return reply
end

-- block: an admin's block, or one a relay made while the store was away.
-- KEYS: blocks, events, counter, would-block mark, unblocked
-- ARGV: 'block', user, record, blocked_at, origin, relay, maxlen, pushed ('1': made while away)
-- Returns {'exists', record} (the fleet has a block already: it stands), {'unblocked', at} (an
-- unblock made after this block was pushed first: the block is dropped), or {'new', ''}.
local function block()
  local user = ARGV[2]
  local existing = redis.call('HGET', KEYS[1], user)
  if existing then
    return {'exists', existing}
  end
  if ARGV[8] == '1' then
    local at = redis.call('ZSCORE', KEYS[5], user)
    if at and tonumber(at) >= tonumber(ARGV[4]) then
      return {'unblocked', at}
    end
  end
  redis.call('HSET', KEYS[1], user, ARGV[3])
  redis.call('DEL', KEYS[3], KEYS[4])
  announce(KEYS[2], ARGV[7], 'op', 'block', 'user', user, 'record', ARGV[3],
    'origin', ARGV[5], 'relay', ARGV[6])
  return {'new', ''}
end

-- unblock: lift a block fleet-wide and remember when (a relay that was away drops its copy).
-- KEYS: blocks, events, counter, would-block mark, unblocked
-- ARGV: 'unblock', user, at, by, origin, relay, maxlen, retention (seconds)
-- Returns {'newer', record} when the fleet's block was made after this unblock (it stands),
-- else {'lifted' or 'absent', record or ''}.
local function unblock()
  local user = ARGV[2]
  local at = tonumber(ARGV[3])
  local existing = redis.call('HGET', KEYS[1], user)
  if existing then
    local blocked_at = tonumber(string.match(existing, '^blocked_at=(%d+)'))
    if blocked_at ~= nil and blocked_at > at then
      return {'newer', existing}
    end
    redis.call('HDEL', KEYS[1], user)
  end
  redis.call('ZADD', KEYS[5], ARGV[3], user)
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. string.format('%.17g', at - tonumber(ARGV[8])))
  redis.call('DEL', KEYS[3], KEYS[4])
  announce(KEYS[2], ARGV[7], 'op', 'unblock', 'user', user, 'by', ARGV[4], 'at', ARGV[3],
    'origin', ARGV[5], 'relay', ARGV[6])
  if existing then
    return {'lifted', existing}
  end
  return {'absent', ''}
end

-- reset: forget a user's counters fleet-wide.
-- KEYS: counter, would-block mark, events
-- ARGV: 'reset', user, by, at, origin, relay, maxlen
-- Returns how many of the two keys existed. Announced only when there was something to
-- forget: the other relays journal what they are told.
local function reset()
  local found = redis.call('DEL', KEYS[1], KEYS[2])
  if found > 0 then
    announce(KEYS[3], ARGV[7], 'op', 'reset', 'user', ARGV[2], 'by', ARGV[3], 'at', ARGV[4],
      'origin', ARGV[5], 'relay', ARGV[6])
  end
  return found
end

-- peek: a user's counting state as of now, for an admin's show; changes nothing.
-- KEYS: counter
-- ARGV: 'peek', user, now, limit, w, then count and period for each window
-- Returns {now, tokens_1, ..., tokens_w, counted_1, ..., counted_w}: the server's time and each
-- bucket's tokens (as strings, refilled up to now), and the distinct failures remembered within
-- each window's period. A user the store does not count has full buckets and none counted.
local function peek()
  local now = clock(ARGV[3])
  local limit = tonumber(ARGV[4])
  local w = tonumber(ARGV[5])
  local counts, periods = {}, {}
  for i = 1, w do
    counts[i] = tonumber(ARGV[4 + 2 * i])
    periods[i] = tonumber(ARGV[5 + 2 * i])
  end
  local updated, tokens, recents = now, {}, {}
  local raw = redis.call('GET', KEYS[1])
  if raw then
    updated, tokens, recents = load(raw, counts, periods, now, limit)
  else
    for i = 1, w do
      tokens[i] = counts[i]
    end
  end
  local elapsed = math.max(0, now - updated)
  local reply = {string.format('%.17g', now)}
  for i = 1, w do
    local level = math.min(counts[i], tokens[i] + elapsed * (counts[i] / periods[i]))
    reply[1 + i] = string.format('%.17g', level)
    local counted = 0
    for _, entry in ipairs(recents) do
      if now - entry[1 + i] < periods[i] then
        counted = counted + 1
      end
    end
    reply[1 + w + i] = counted
  end
  return reply
end

local operations = {count = count, block = block, unblock = unblock, reset = reset, peek = peek}
local operation = operations[ARGV[1]]
if operation == nil then
  return redis.error_reply('spamguardd: unknown operation ' .. tostring(ARGV[1]))
end
return operation()
