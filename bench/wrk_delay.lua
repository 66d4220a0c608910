-- Keep each wrk connection at about one request per millisecond: a sustained load that
-- leaves CPU for HAProxy and the reloader on a 2-core machine, instead of saturating it.
function delay()
  return 1
end
