"""One training loop (callbacks for the per-step trace), checkpoint schedules and resume."""
