//! The report page: one self-contained HTML file, every image inline as a PNG data URI.

use super::{model_input, ClassSummary, Record, Report};
use base64::Engine as _;
use std::collections::HashMap;
use std::fmt::Write as _;

/// A perceptual dark-to-bright colour map (black, purple, red, orange, yellow-white).
fn colormap(v: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] =
        [[0.0, 0.0, 4.0], [87.0, 16.0, 110.0], [188.0, 55.0, 84.0], [249.0, 142.0, 9.0], [252.0, 255.0, 164.0]];
    let v = v.clamp(0.0, 1.0) * 4.0;
    let i = (v.floor() as usize).min(3);
    let t = v - i as f32;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    [0, 1, 2].map(|k| (a[k] + (b[k] - a[k]) * t).round() as u8)
}

/// Side of the clusters' member thumbnails, in pixels (shown at 40 px, 48 for sharp screens).
const THUMB: u32 = 48;

fn png_uri(img: &image::RgbImage) -> String {
    let mut buf = std::io::Cursor::new(Vec::new());
    if img.write_to(&mut buf, image::ImageFormat::Png).is_err() {
        return String::new();
    }
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(buf.into_inner()))
}

/// Card images are shown at this side (CSS pixels): larger model inputs are scaled down to it
/// before they go into the page (at 224 px, full-size PNGs made a card 230 KB).
const DISPLAY: u32 = 128;

/// `img` no larger than [`DISPLAY`] on either side (aspect kept) as a JPEG data URI: the model
/// input and the overlay are photos, which PNG stores at several times the size.
fn shown_uri(img: &image::RgbImage) -> String {
    let (w, h) = img.dimensions();
    let small;
    let img = if w.max(h) > DISPLAY {
        let s = DISPLAY as f64 / w.max(h) as f64;
        let (sw, sh) = (((w as f64 * s).round() as u32).max(1), ((h as f64 * s).round() as u32).max(1));
        small = image::imageops::resize(img, sw, sh, image::imageops::FilterType::Triangle);
        &small
    } else {
        img
    };
    let mut buf = Vec::new();
    if image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 85).encode_image(img).is_err() {
        return String::new();
    }
    format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(buf))
}

/// A map (h × w, any scale) as a colour image of `out_w × out_h`, scaled to its maximum.
fn heat(map: &[f32], h: usize, w: usize, out_w: u32, out_h: u32) -> image::RgbImage {
    let max = map.iter().cloned().fold(0f32, f32::max);
    let gray = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_fn(w as u32, h as u32, |x, y| {
        image::Luma([if max > 0.0 { map[y as usize * w + x as usize] / max } else { 0.0 }])
    });
    let up = image::imageops::resize(&gray, out_w, out_h, image::imageops::FilterType::Triangle);
    image::RgbImage::from_fn(out_w, out_h, |x, y| image::Rgb(colormap(up.get_pixel(x, y)[0])))
}

/// The heat map blended over the image, more opaque where the map is strong.
fn overlay(rgb: &[u8], w: u32, h: u32, map: &[f32], side: usize) -> image::RgbImage {
    let max = map.iter().cloned().fold(0f32, f32::max);
    let gray = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_fn(side as u32, side as u32, |x, y| {
        image::Luma([if max > 0.0 { map[y as usize * side + x as usize] / max } else { 0.0 }])
    });
    let up = image::imageops::resize(&gray, w, h, image::imageops::FilterType::Triangle);
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = up.get_pixel(x, y)[0].clamp(0.0, 1.0);
        let c = colormap(v);
        let a = 0.25 + 0.6 * v;
        let i = ((y * w + x) * 3) as usize;
        image::Rgb([0, 1, 2].map(|k| ((1.0 - a) * rgb[i + k] as f32 * 0.8 + a * c[k] as f32).round() as u8))
    })
}

/// Images of the samples the page shows, made once each.
pub struct SampleImages {
    cache: HashMap<usize, [String; 4]>,
}

impl SampleImages {
    pub fn new(r: &Report) -> Self {
        let mut wanted: Vec<usize> = Vec::new();
        for c in r.classes.iter().filter(|c| r.detailed.contains(&c.class)) {
            wanted.extend(&c.ranked);
            for k in &c.clusters {
                wanted.extend(&k.top_members);
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        let cache = wanted.into_iter().map(|i| (i, Self::make(r, &r.records[i]))).collect();
        Self { cache }
    }

    /// The model input, the map over it, the CAM, and a small copy of the second for the
    /// clusters' member thumbnails (shown at 40 px: full-size copies made most of a page's bytes).
    fn make(r: &Report, rec: &Record) -> [String; 4] {
        let Some(m) = &rec.maps else { return Default::default() };
        let cam = shown_uri(&heat(&m.cam, m.cam_h, m.cam_w, DISPLAY, DISPLAY));
        let thumb = |img: &image::RgbImage| png_uri(&image::imageops::thumbnail(img, THUMB, THUMB));
        match model_input(r, rec) {
            Some((rgb, w, h)) => {
                let img = image::RgbImage::from_raw(w, h, rgb.clone()).unwrap_or_default();
                let ov = overlay(&rgb, w, h, &m.map, m.map_side);
                [shown_uri(&img), shown_uri(&ov), cam, thumb(&ov)]
            }
            None => {
                let map = heat(&m.map, m.map_side, m.map_side, DISPLAY, DISPLAY);
                [String::new(), shown_uri(&map), cam, thumb(&map)]
            }
        }
    }

    fn get(&self, i: usize) -> Option<&[String; 4]> {
        self.cache.get(&i)
    }
}

/// Text for the page's element content and (double- or single-quoted) attribute values.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn fmt_opt(v: Option<f32>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into())
}

fn card(out: &mut String, r: &Report, imgs: &SampleImages, i: usize, name_of: &dyn Fn(i64) -> String) {
    let rec = &r.records[i];
    let Some([img, ov, cam, _]) = imgs.get(i) else { return };
    // Red where the sample itself takes its flagged cluster's shortcut, not every member.
    let flag = if rec.shortcut { " flagged" } else { "" };
    let _ = write!(out, r#"<div class="card{flag}" data-id="{}">"#, esc(&rec.id));
    out.push_str(r#"<div class="imgs">"#);
    for (uri, what) in [(img, "model input"), (ov, "guided Grad-CAM"), (cam, "Grad-CAM")] {
        if uri.is_empty() {
            let _ = write!(out, r#"<div class="missing" title="{what}">image not found</div>"#);
        } else {
            let _ = write!(out, r#"<img src="{uri}" alt="{what}" title="{what}">"#);
        }
    }
    out.push_str("</div>");
    let _ = write!(
        out,
        r#"<div class="cap"><b>{}</b><br>label {} · predicted {} ({})<br>score {} · rank {} · cluster {}</div></div>"#,
        esc(&rec.id),
        rec.label.map(|l| esc(&name_of(l))).unwrap_or_else(|| "–".into()),
        rec.predicted.map(|p| esc(&name_of(p))).unwrap_or_else(|| "–".into()),
        rec.predicted_prob.map(|p| format!("{:.0}%", p * 100.0)).unwrap_or_default(),
        fmt_opt(rec.score),
        rec.rank.map(|r| r.to_string()).unwrap_or_else(|| "–".into()),
        rec.cluster.map(|c| c.to_string()).unwrap_or_else(|| "–".into()),
    );
}

fn class_section(out: &mut String, r: &Report, c: &ClassSummary, imgs: &SampleImages, name_of: &dyn Fn(i64) -> String) {
    let _ = write!(out, r#"<section class="class" id="class-{}"><h2>{}</h2>"#, c.class, esc(&c.name));
    let mean = shown_uri(&heat(&c.mean_map, c.map_side, c.map_side, DISPLAY, DISPLAY));
    let _ = write!(
        out,
        r#"<div class="row"><figure><img src="{mean}" alt="class mean map"><figcaption>class mean map</figcaption></figure>"#
    );
    out.push_str(r#"<div class="clusters">"#);
    for k in &c.clusters {
        let uri = shown_uri(&heat(&k.mean_map, k.side, k.side, 96, 96));
        let flag = if k.flagged { " flagged" } else { "" };
        let _ = write!(
            out,
            r#"<figure class="cluster{flag}"><img src="{uri}" alt="cluster {} mean map"><figcaption>cluster {}: {} samples{}{}<br>concentration {:.2} · outside object {} · in region {}</figcaption><div class="members">"#,
            k.id,
            k.id,
            k.size,
            if k.without_mass > 0 { format!(" ({} with an all-zero map)", k.without_mass) } else { String::new() },
            if k.flagged { " · Clever-Hans candidate" } else { "" },
            k.concentration,
            fmt_opt(k.mean_outside_object),
            fmt_opt(k.mean_max_region),
        );
        for &m in &k.top_members {
            if let Some([_, _, _, thumb]) = imgs.get(m) {
                let _ = write!(out, r#"<img class="thumb" src="{thumb}" title="{}">"#, esc(&r.records[m].id));
            }
        }
        out.push_str("</div></figure>");
    }
    out.push_str("</div></div>");
    if c.ranked.is_empty() {
        let scored = r.records.iter().any(|x| x.class == c.class && x.score.is_some());
        let why = match scored {
            true => "none asked for (--top 0)".to_owned(),
            false => format!("no sample of this class has a {}", esc(&r.score_label)),
        };
        let _ = write!(out, "<h3>No ranking</h3><p>No ranking: {why}.</p></section>");
        return;
    }
    let _ = write!(out, "<h3>Top {} by spurious score</h3><div class=\"cards\">", c.ranked.len());
    for &i in &c.ranked {
        card(out, r, imgs, i, name_of);
    }
    out.push_str("</div></section>");
}

/// The whole page.
pub fn render(r: &Report, imgs: &SampleImages, name_of: &dyn Fn(i64) -> String) -> String {
    let mut out = String::with_capacity(1 << 20);
    out.push_str(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>saliency-audit report</title><style>
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}
td:first-child,th:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;width:410px}
.card.flagged{border-color:#c33}.imgs{display:flex;gap:4px}.imgs img,.missing{width:128px;height:128px;image-rendering:pixelated}
.missing{display:flex;align-items:center;justify-content:center;background:#eee;color:#888;font-size:12px}
.cap{font-size:12px;margin-top:4px;overflow-wrap:anywhere}.row{display:flex;gap:16px;align-items:flex-start}.clusters{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}figure.flagged{border:2px solid #c33}
figcaption{font-size:12px;max-width:260px;overflow-wrap:anywhere}.warning{color:#a00}.thumb{width:40px;height:40px;margin:1px}.members{margin-top:4px}
</style></head><body>"#,
    );
    let _ = write!(
        out,
        "<h1>saliency-audit report</h1><p>Output folder <code>{}</code>. {} samples with attributions in {} classes. \
         Samples are ranked by the {}. Clusters are strategy clusters of the normalised attribution maps \
         (spectral clustering on a nearest-neighbour affinity, as SpRAy); a red border marks a Clever-Hans candidate: \
         a cluster whose attribution concentrates away from the object, and each sample of it whose own attribution \
         does (a flagged cluster may also hold samples that do not).</p>",
        esc(&r.dir.to_string()),
        r.records.len(),
        r.classes.len(),
        esc(&r.score_label)
    );
    if let Some(note) = &r.incomplete {
        let _ = write!(out, r#"<p class="warning"><b>Warning:</b> {}.</p>"#, esc(note));
    }
    if let Some(note) = super::unranked_note(r) {
        let _ = write!(out, "<p><b>Note:</b> {}.</p>", esc(&note));
    }
    if let Some(note) = super::coarse_maps_note(r) {
        let _ = write!(out, r#"<p class="warning"><b>Warning:</b> {}.</p>"#, esc(&note));
    }
    if !r.failed.is_empty() {
        let f: Vec<String> = r.failed.iter().map(|(k, v)| format!("{} {v}", esc(k))).collect();
        let _ = write!(out, "<p>Rows that failed and are not shown: {}.</p>", f.join(", "));
    }
    if r.detailed.len() < r.classes.len() {
        let _ = write!(
            out,
            "<p>Sections below for {} of the {} classes: those with the most samples in flagged clusters, then \
             the highest mean score (<code>--max-classes</code>). <code>scores.parquet</code> has every sample.</p>",
            r.detailed.len(),
            r.classes.len()
        );
    }
    out.push_str("<table><tr><th>class</th><th>count</th><th>accuracy</th><th>bbox share</th><th>mask share</th>");
    for n in &r.region_names {
        let _ = write!(out, "<th>region {}</th>", esc(n));
    }
    out.push_str("<th>entropy</th><th>clusters</th><th>flagged</th></tr>");
    for c in &r.classes {
        let _ = write!(
            out,
            r##"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"##,
            if r.detailed.contains(&c.class) {
                format!(r##"<a href="#class-{}">{}</a>"##, c.class, esc(&c.name))
            } else {
                esc(&c.name)
            },
            c.count,
            c.accuracy.map(|a| format!("{:.1}%", a * 100.0)).unwrap_or_else(|| "–".into()),
            fmt_opt(c.mean_bbox_share),
            fmt_opt(c.mean_mask_share)
        );
        for v in &c.mean_region_shares {
            let _ = write!(out, "<td>{}</td>", fmt_opt(*v));
        }
        let _ = write!(
            out,
            "<td>{}</td><td>{}</td><td>{}</td></tr>",
            fmt_opt(c.mean_entropy),
            c.clusters.len(),
            c.clusters.iter().filter(|k| k.flagged).count()
        );
    }
    out.push_str("</table>");
    for c in r.classes.iter().filter(|c| r.detailed.contains(&c.class)) {
        class_section(&mut out, r, c, imgs, name_of);
    }
    out.push_str("</body></html>\n");
    out
}
