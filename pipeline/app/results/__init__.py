"""What a user reads: an output directory's files (``outputs``), ``report.html``
(``report``) and metrics with bootstrap intervals (``evaluation``)."""
