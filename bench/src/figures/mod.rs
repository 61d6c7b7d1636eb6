//! One module per scenario; each returns the figures it measured.

pub mod inproc_dispatch;
