//! Issue 14: sizing modes, original alerts, trailing stops, risk limits.
