-- Every request a different head (the query counts up): no two heads on a connection
-- are the same, so wakeproxy's "same head as the last one" shortcut never applies.
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/?n=" .. n)
end
