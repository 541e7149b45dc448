-- The script functions a subscription pins: its version's and every dependency's (the closure at
-- subscribe time; published versions are immutable). They count against the subscriber tenant's
-- share of the function budget (customscripts/faas/budget.py). NULL on rows from before this
-- column: those pin their own version's function only.
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS functions text[];
