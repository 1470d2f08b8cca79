//! The host's Docker engine for the pipeline layer, behind a policy (issue 5, in progress).
//!
//! Today: [`policy`], the pure decisions of the socket regobox will give the application (which
//! endpoints, what a container create may ask for, bind translation, the instance label and
//! default limits). The proxy serving that socket, the engine connection and the lifecycle are
//! not written yet.

pub mod policy;
