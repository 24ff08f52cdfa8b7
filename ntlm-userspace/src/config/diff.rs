//! Reload plan.
