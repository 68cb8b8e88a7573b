//! Storage controllers and disk images.
//!
//! - [`aio`]: the [`aio::IoEngine`] job queue that runs image I/O off the vCPU threads.
//! - [`image`]: the [`image::BlockBackend`] trait, raw-file / in-memory images and
//!   [`image::open_image`].
//! - [`qcow2`]: qcow2 images (v2/v3, backing chains) on the `imago` crate.
//! - [`ata`]: the transport-independent ATA command layer (IDENTIFY, command decoding, sector I/O),
//!   shared by IDE now and AHCI later.
//! - [`atapi`]: the transport-independent ATAPI CD/DVD-ROM (SCSI/MMC) command layer.
//! - [`bmdma`]: SFF-8038i bus-master DMA (PRD walker, step-wise DMA engine).
//! - [`ide`]: the PIIX3 IDE controller (legacy task-file ports + bus-master block).
//! - [`ahci`]: the ICH9 AHCI controller (command lists, FISes, PRDTs, NCQ, MSI).

pub mod ahci;
pub mod aio;
pub mod ata;
pub mod atapi;
pub mod bmdma;
pub mod ide;
pub mod image;
pub mod qcow2;

pub use aio::{AioError, IoEngine};
pub use ata::{DiskConfig, DriveKind};
pub use atapi::{AtapiAction, AtapiDrive, AtapiError, CdConfig};
pub use ide::{IdeController, IdeError};
pub use image::{open_image, BlockBackend, BlockError, ImageFormat, MemImage, RawFile};
