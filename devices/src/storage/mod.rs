//! Storage controllers and disk images.
//!
//! - [`image`]: the [`image::BlockBackend`] trait and raw-file / in-memory images.
//! - [`ata`]: the transport-independent ATA command layer (IDENTIFY, command decoding, sector I/O),
//!   shared by IDE now and AHCI later.
//! - [`bmdma`]: SFF-8038i bus-master DMA (PRD walker, step-wise DMA engine).
//! - [`ide`]: the PIIX3 IDE controller (legacy task-file ports + bus-master block).
//! - [`ahci`]: the ICH9 AHCI controller (command lists, FISes, PRDTs, NCQ, MSI).

pub mod ahci;
pub mod ata;
pub mod bmdma;
pub mod ide;
pub mod image;

pub use ata::{DiskConfig, DriveKind};
pub use ide::{IdeController, IdeError};
pub use image::{BlockBackend, BlockError, MemImage, RawFile};
