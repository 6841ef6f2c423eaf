//! The netns lab shared by integration tests, the demo and benchmarks.
