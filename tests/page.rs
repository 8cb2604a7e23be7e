//! The catalog page.
