"""Where time and bytes go: operator profiles, file byte breakdowns, thread diagnoses."""
