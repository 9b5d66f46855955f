//! Synthetic-input engine timing for `saliency-audit bench --model`.

use super::{EngineOptions, GuidedGradCam};
use anyhow::{bail, Result};
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One synthetic benchmark's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyntheticBench {
    pub device: String,
    pub batch: i64,
    pub iters: usize,
    pub threads: i32,
    /// Median seconds per batch.
    pub s_per_batch: f64,
    pub images_per_s: f64,
    /// Peak resident memory of the process minus its resident memory after loading the model
    /// and before the first batch (CPU only; bytes).
    pub peak_rss_delta_bytes: Option<u64>,
}

/// Times `iters` batches (after `warmup`) of random input with per-example targets.
pub fn synthetic(
    model: &Path,
    device: Device,
    opts: EngineOptions,
    batch: i64,
    iters: usize,
    warmup: usize,
) -> Result<SyntheticBench> {
    if batch < 1 || iters < 1 {
        bail!("batch and iters must be at least 1");
    }
    let engine = GuidedGradCam::load(model, device, opts)?;
    let meta = engine.meta().clone();
    let [h, w] = meta.input_size.unwrap_or([224, 224]);
    let c = meta.channels.unwrap_or(3);
    let (classes, _) = engine.probe(c, h, w)?;
    tch::manual_seed(0);
    let x = Tensor::randn([batch, c, h, w], (Kind::Float, device));
    let targets: Vec<Option<i64>> = (0..batch).map(|i| Some((i * 7919) % classes)).collect();
    let rss0 = rss_bytes();
    reset_peak_rss();
    for _ in 0..warmup {
        engine.attribute(&x, &targets)?;
    }
    // The warm-up's last kernels finish before the first timed batch starts.
    if let Device::Cuda(d) = device {
        tch::Cuda::synchronize(d as i64);
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let r = engine.attribute(&x, &targets)?;
        // Wait for the device: reading one value synchronises.
        let _ = r.attribution.get(0).get(0).get(0).get(0).double_value(&[]);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let s = times[times.len() / 2];
    let peak = peak_rss_bytes();
    Ok(SyntheticBench {
        device: super::device_name(device),
        batch,
        iters,
        threads: tch::get_num_threads(),
        s_per_batch: s,
        images_per_s: batch as f64 / s,
        peak_rss_delta_bytes: match (device, rss0, peak) {
            (Device::Cpu, Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
    })
}

fn status_field(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn rss_bytes() -> Option<u64> {
    status_field("VmRSS:")
}

fn peak_rss_bytes() -> Option<u64> {
    status_field("VmHWM:")
}

/// Resets the kernel's peak-RSS counter (VmHWM) of this process, so the peak is measured from now.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One line of a device-scaling benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScalingRow {
    /// The devices used together.
    pub devices: Vec<String>,
    /// Images per second, all devices together.
    pub images_per_s: f64,
    /// Images per second of each device in that run.
    pub per_device: Vec<f64>,
    /// `images_per_s / (k × the first device's rate alone)`.
    pub efficiency: f64,
}

/// Engine throughput on synthetic u8 batches through the production path (upload, convert and
/// normalise on the device, attribute, reduce over channels, download), for the first 1, 2, …, N
/// devices at once, each with its own replica pulling from one shared counter of batches.
/// `stats_on_device` (`None`: on for CUDA devices, as in a job) also reduces each map to its
/// statistics' sums and a 64×64 map on the device, so only those are downloaded.
pub fn synthetic_scaling(
    model: &Path,
    devices: &[Device],
    opts: EngineOptions,
    batch: usize,
    iters: usize,
    warmup: usize,
    stats_on_device: Option<bool>,
) -> Result<Vec<ScalingRow>> {
    use super::batch::{Attributor, TorchAttributor, U8Batch};
    use std::sync::atomic::{AtomicUsize, Ordering};
    if devices.is_empty() || batch == 0 || iters == 0 {
        bail!("need at least one device, a batch of at least 1 and at least one iteration");
    }
    let meta = super::read_meta(model)?.unwrap_or_default();
    let [h, w] = meta.input_size.unwrap_or([224, 224]);
    let c = meta.channels.unwrap_or(3) as usize;
    let mean = meta.mean.clone().unwrap_or_else(|| vec![0.5; c]);
    let std = meta.std.clone().unwrap_or_else(|| vec![0.25; c]);
    let mut replicas = Vec::new();
    for d in devices {
        let mut r = TorchAttributor::load(model, *d, opts, &mean, &std)?;
        if stats_on_device.unwrap_or(d.is_cuda()) {
            r.set_reduction(Some(super::reduce::Reduction { map_size: 64, regions: Vec::new() }));
        }
        replicas.push(r);
    }
    let (classes, _) = replicas[0].engine().probe(c as i64, h, w)?;
    let (h, w) = (h as usize, w as usize);
    // A fixed pseudo-random batch (the content does not change the work).
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..batch * h * w * 3)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect();
    let targets = (0..batch as i64).map(|i| Some((i * 7919) % classes)).collect();
    let input = U8Batch { n: batch, h, w, data, targets, ..U8Batch::default() };
    let mut rows: Vec<ScalingRow> = Vec::new();
    for k in 1..=replicas.len() {
        let total = iters * k;
        let next = AtomicUsize::new(0);
        // Each thread warms its replica up itself (libtorch keeps cuDNN's benchmark-mode
        // choices per thread), says so, and waits for the others before its timed batches;
        // the clock starts once all have. (Channels, not a barrier: if this thread unwinds, say
        // because a thread could not be started, dropping the go lets the others finish.)
        let (warm_tx, warm_rx) = crossbeam_channel::bounded::<()>(k);
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
        let mut start = Instant::now();
        let counts: Vec<Result<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = replicas[..k]
                .iter_mut()
                .map(|r| {
                    let (next, input, warm_tx, go_rx) = (&next, &input, warm_tx.clone(), go_rx.clone());
                    s.spawn(move || -> Result<usize> {
                        // Whatever happens here, the thread says it is warm (or the clock would wait).
                        let warm = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            (0..warmup).try_for_each(|_| r.attribute(input).map(drop))?;
                            // The warm-up's last kernels finish before the clock starts.
                            if let Device::Cuda(i) = r.engine().device() {
                                tch::Cuda::synchronize(i as i64);
                            }
                            Ok(())
                        }))
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked while warming up")));
                        let _ = warm_tx.send(());
                        // Closed, not sent to: the go.
                        let _ = go_rx.recv();
                        warm?;
                        let mut done = 0;
                        while next.fetch_add(1, Ordering::Relaxed) < total {
                            r.attribute(input)?;
                            done += batch;
                        }
                        Ok(done)
                    })
                })
                .collect();
            drop(warm_tx);
            let _ = warm_rx.iter().take(k).count();
            // The clock first, then the go: no timed batch starts before it.
            start = Instant::now();
            drop(go_tx);
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked"))))
                .collect()
        });
        let secs = start.elapsed().as_secs_f64();
        let counts: Vec<usize> = counts.into_iter().collect::<Result<_>>()?;
        let per_device: Vec<f64> = counts.iter().map(|n| *n as f64 / secs).collect();
        let rate = per_device.iter().sum::<f64>();
        let single = rows.first().map_or(rate, |r| r.images_per_s);
        rows.push(ScalingRow {
            devices: devices[..k].iter().map(|d| super::device_name(*d)).collect(),
            images_per_s: rate,
            per_device,
            efficiency: rate / (k as f64 * single),
        });
    }
    Ok(rows)
}
