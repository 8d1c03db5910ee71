//! Sluice's sources and codecs: MQTT, serial and UDP collectors that decode
//! readings and hand them to the pipeline through `sluice_core::ring`.
//!
//! This crate is a skeleton until the collectors land (issue #4); it exists so
//! that the workspace has its final shape and crate boundaries from the start.
