"""The moderators' review log, the review queue and the export of verdicts."""
