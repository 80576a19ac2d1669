"""The statuses of manifest rows (the ``status`` column of the results tables and reports)."""

# What happened to a manifest row (the ``status`` column of the results):
#   succeeded              computed by this run
#   cached                 already done before this run started (its meta.json existed)
#   done_elsewhere         computed by another run at the same time; this run waited for its result
#   in_progress_elsewhere  another run still holds the item's lease; a re-run picks up its result
#   failed                 the work failed; ``error`` says why
#   invalid                refused at validation; ``error`` names the row, column and reason
STATUSES = ("succeeded", "cached", "done_elsewhere", "in_progress_elsewhere", "failed", "invalid")
DONE_STATUSES = ("succeeded", "cached", "done_elsewhere")  # rows whose item has its outputs
ALWAYS_SHOWN_STATUSES = ("succeeded", "cached", "failed", "invalid")  # summaries show the concurrent-run ones only when they occur
