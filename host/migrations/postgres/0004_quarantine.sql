-- Plugins whose routes are paused after too many consecutive faults (traps, time and
-- memory limits). Shared by every instance, so one instance's verdict pauses the routes
-- everywhere; `herald plugins resume NAME` deletes the row.
CREATE TABLE herald_quarantine (
    plugin TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    faults BIGINT NOT NULL,
    since  TIMESTAMPTZ NOT NULL DEFAULT now()
);
