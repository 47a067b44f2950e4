//! Library code behind the measuring and data subcommands of the CLI: [`bench`] (speed of the
//! chain against its baselines), [`perplexity`] (quality of a bundle on a text) and [`capture`]
//! (residual-stream states for training steering methods).

pub mod bench;
pub mod capture;
pub mod perplexity;
