#!/usr/bin/env python3
"""Image test cases for the decode stage (JPEG mostly; PNG, GIF, BMP, TIFF, WebP, PPM), with what
PIL (and so torchvision) makes of them.

Usage: python scripts/make_decode_cases.py OUT_DIR
Writes OUT_DIR/<case>.<ext>, OUT_DIR/<case>.rgb (PIL's decode after exif_transpose and
convert("RGB"): raw RGB8, row-major), and torchvision's transforms of that image, raw RGB8:
<case>.<transform>.rgb for each of TRANSFORMS; and OUT_DIR/cases.json.
"""
import io
import json
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

# name: (Resize's size: an int for the shorter side, or [h, w]; CenterCrop's size or None)
TRANSFORMS = {
    "input": (96, 80),  # the usual eval transform, scaled down
    "imagenet": (256, 224),  # the usual eval transform
    "exact": ([70, 90], None),  # Resize((h, w)): the aspect ratio changes
    "padded": (64, 80),  # a crop larger than the resized image: zero padding
}

# Cases known to differ from PIL, by at most this many grey levels: a TIFF's JPEG-compressed
# strips are decoded by the image crate, which rounds some pixels differently from libjpeg.
KNOWN_DIFFERENCES = {"tiff_jpeg": 1}


def photo(w, h, seed, grey=False):
    """Smooth colour fields with sensor-like noise (sigma 12): a file of photo-like size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 60 * np.sin(x / 40.0), 128 + 60 * np.cos(y / 30.0), 128 + 40 * np.sin((x + y) / 50.0)], -1)
    img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(img)
    return im.convert("L") if grey else im


def orientation_exif(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def with_orientation(im, value, **save):
    exif = Image.Exif()
    exif[0x0112] = value
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), **save)
    return buf.getvalue()


def encode(im, fmt="JPEG", **save):
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def palette_with_transparency(im):
    """A palette image whose first entry is transparent (a tRNS chunk)."""
    p = im.quantize(32)
    p.info["transparency"] = 0
    return p


def gif_offset(data, screen, at):
    """The GIF with its logical screen made `screen` (w, h) and its first frame placed at `at`
    (x, y): PIL fills the screen outside the frame."""
    b = bytearray(data)
    b[6:10] = screen[0].to_bytes(2, "little") + screen[1].to_bytes(2, "little")
    i = 13 + (3 << ((b[10] & 7) + 1) if b[10] & 0x80 else 0)
    while b[i] == 0x21:  # extension blocks: label, then sub-blocks up to an empty one
        i += 2
        while b[i]:
            i += b[i] + 1
        i += 1
    assert b[i] == 0x2C, "image descriptor"
    b[i + 1:i + 5] = at[0].to_bytes(2, "little") + at[1].to_bytes(2, "little")
    return bytes(b)


def animated_webp(first, second):
    """A two-frame animated WebP whose frames have transparent parts: the first frame is what
    PIL reads."""
    frames = []
    for k, im in enumerate([first, second]):
        a = np.asarray(im.convert("RGBA")).copy()
        a[(k * 20):(k * 20 + 30), 10:60, 3] = 0
        frames.append(Image.fromarray(a, "RGBA"))
    return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=100)


def blend_first_frame(data):
    """The animated WebP with its first frame's "blend" flag on (bit 1 of the ANMF flags clear),
    as some encoders write it: libwebp, and so PIL, draws a first frame as it is either way."""
    b = bytearray(data)
    at = 12
    while b[at:at + 4] != b"ANMF":
        n = int.from_bytes(b[at + 4:at + 8], "little")
        at += 8 + n + (n & 1)
    b[at + 8 + 15] &= ~0b10 & 0xFF
    return bytes(b)


XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{}"/></rdf:RDF></x:xmpmeta>')


def long_orientation_exif(value):
    """An EXIF block whose Orientation tag is a LONG, as some writers store it (big-endian)."""
    return (b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x04\x00\x00\x00\x01"
            + value.to_bytes(4, "big") + b"\x00\x00\x00\x00")


def png_text(im, key, text, itxt=False):
    """A PNG with one compressed text chunk (zTXt, or iTXt)."""
    info = PngImagePlugin.PngInfo()
    if itxt:
        info.add_itxt(key, text, zip=True)
    else:
        info.add_text(key, text, zip=True)
    return encode(im, "PNG", pnginfo=info)


def raw_profile_exif(value):
    """ImageMagick's way of keeping EXIF in a PNG: the block as hex in a text chunk."""
    data = orientation_exif(value)
    if not data.startswith(b"Exif"):
        data = b"Exif\x00\x00" + data
    h = data.hex()
    return "\nexif\n%8d\n" % len(data) + "\n".join(h[i:i + 72] for i in range(0, len(h), 72)) + "\n"


def exif_after_idat(data):
    """The PNG with its eXIf chunk moved after the image data, just before IEND."""
    at = data.index(b"eXIf") - 4
    n = int.from_bytes(data[at:at + 4], "big")
    chunk, rest = data[at:at + 12 + n], data[:at] + data[at + 12 + n:]
    end = rest.rindex(b"IEND") - 4
    return rest[:end] + chunk + rest[end:]


def bmp16(im, g_bits):
    """A 16-bit BMP (PIL writes none): 5-5-5 as plain BI_RGB, or 5-6-5 as bit fields."""
    a = np.asarray(im.convert("RGB")).astype(np.uint32)
    h, w, _ = a.shape
    r, g, b = a[..., 0] >> 3, a[..., 1] >> (8 - g_bits), a[..., 2] >> 3
    px = ((r << (5 + g_bits)) | (g << 5) | b).astype("<u2")
    stride = (w * 2 + 3) & ~3
    rows = b"".join(px[y].tobytes().ljust(stride, b"\x00") for y in range(h - 1, -1, -1))
    masks = b"" if g_bits == 5 else b"".join(m.to_bytes(4, "little") for m in (0xF800, 0x07E0, 0x001F))
    offset = 14 + 40 + len(masks)
    info = (40).to_bytes(4, "little") + w.to_bytes(4, "little") + h.to_bytes(4, "little") \
        + (1).to_bytes(2, "little") + (16).to_bytes(2, "little") \
        + (0 if g_bits == 5 else 3).to_bytes(4, "little") + len(rows).to_bytes(4, "little") + bytes(16)
    head = b"BM" + (offset + len(rows)).to_bytes(4, "little") + bytes(4) + offset.to_bytes(4, "little")
    return head + info + masks + rows


def without_iend(data):
    """The PNG cut before its end chunk (PIL reads the image without it)."""
    assert data.endswith(b"IEND\xaeB`\x82")
    return data[:-12]


def bad_idat_crc(data):
    """The PNG with its image data's checksum wrong (PIL does not check it)."""
    at = data.index(b"IDAT")
    end = at + 4 + int.from_bytes(data[at - 4:at], "big")
    return data[:end] + bytes([data[end] ^ 0xFF]) + data[end + 1:]


def ifd0(entries, pad=b""):
    """A big-endian TIFF structure whose IFD0 holds `entries` (tag, type, count, 4-byte value or
    offset); `pad` follows the IFD, at offset 10 + 12 * len(entries) + 4."""
    t = b"MM\x00*" + struct.pack(">IH", 8, len(entries))
    for tag, typ, count, value in entries:
        t += struct.pack(">HHI", tag, typ, count) + value
    return t + b"\x00\x00\x00\x00" + pad


def jpeg_app1(data, segments):
    """The JPEG with APP1 segments inserted after its SOI marker."""
    out = b"".join(b"\xff\xe1" + struct.pack(">H", len(s) + 2) + s for s in segments)
    return data[:2] + out + data[2:]


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_before_iend(data, chunks):
    assert data.endswith(b"IEND\xaeB`\x82")
    return data[:-12] + chunks + data[-12:]


def os2_bmp_24(im):
    """A 24-bit BMP with the 12-byte OS/2 header, whose first pixels' bytes read, where a
    larger header keeps its bit depth and compression, as "16 bits, no compression"."""
    a = np.asarray(im.convert("RGB"))[::-1, :, ::-1].copy()
    h, w, _ = a.shape
    assert (w * 3) % 4 == 0
    a.reshape(-1)[2:8] = [16, 0, 0, 0, 0, 0]
    rows = a.tobytes()
    return b"BM" + struct.pack("<IHHI", 26 + len(rows), 0, 0, 26) + struct.pack("<IHHHH", 12, w, h, 1, 24) + rows


def animated_gif(first, second):
    """A two-frame animated GIF: the first frame is what PIL reads."""
    frames = [im.quantize(64) for im in (first, second)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def raw_png(w, h, depth, interlace, raw):
    """A colour (RGB) PNG of filtered scanlines `raw`, chunk by chunk (for what PIL does not
    write)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, 2, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png16(im, seed):
    """A 16-bit RGB PNG (PIL does not write one): the 8-bit image times 257 plus noise in the
    low byte."""
    a = np.asarray(im).astype(np.uint16) * 257
    a = a ^ np.random.default_rng(seed).integers(0, 256, a.shape, dtype=np.uint16)
    h, w, _ = a.shape
    return raw_png(w, h, 16, 0, b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a))


def ppm_wide(im, maxval, seed):
    """A binary PPM of more than 8 bits (maxval 256..65535, 16-bit samples): the 8-bit image
    scaled to maxval, plus noise."""
    a = np.asarray(im).astype(np.float64) * maxval / 255
    a = a + np.random.default_rng(seed).uniform(-0.5, 0.5, a.shape) * maxval / 255
    a = np.clip(np.round(a), 0, maxval).astype(">u2")
    h, w, _ = a.shape
    return f"P6\n{w} {h}\n{maxval}\n".encode() + a.tobytes()


def interlaced_png(im):
    """An Adam7-interlaced RGB PNG (PIL does not write one): the seven passes' sub-images."""
    a = np.asarray(im)
    h, w, _ = a.shape
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = a[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    return raw_png(w, h, 8, 1, raw)


def two_exif(data, second):
    """The JPEG with a second EXIF segment (orientation `second`) after its first: PIL reads
    the first."""
    exif = Image.Exif()
    exif[0x0112] = second
    payload = exif.tobytes()
    if not payload.startswith(b"Exif"):
        payload = b"Exif\x00\x00" + payload
    app1 = data.index(b"\xff\xe1")
    end = app1 + 2 + int.from_bytes(data[app1 + 2:app1 + 4], "big")
    return data[:end] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[end:]


def damaged(data):
    """The JPEG with every 7th byte of the last two thirds of its scan overwritten (no marker
    bytes made): libjpeg warns of corrupt data and decodes around it, and PIL keeps that."""
    b = bytearray(data)
    sos = b.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(b[sos + 2:sos + 4], "big")
    end = len(b) - 2
    for i in range(start + (end - start) // 3, end - 8, 7):
        if b[i] != 0xFF and b[i - 1] != 0xFF:
            b[i] = 0x5A
    return bytes(b)


def tail_marker(data):
    """The JPEG with a reserved marker (0xFF02) written into its scan data near the end, in rows
    a centre crop leaves out: libjpeg's entropy decoder stops there with a warning, and reading
    on to the end of the image it meets the marker and stops with a fatal error, so PIL (which
    reads every row) refuses the file."""
    b = bytearray(data)
    sos = b.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(b[sos + 2:sos + 4], "big")
    i = len(b) - 2 - (len(b) - 2 - start) // 60
    while b[i - 1] == 0xFF:
        i -= 1
    b[i], b[i + 1] = 0xFF, 0x02
    return bytes(b)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    import torchvision.transforms.functional as TF

    cases = {
        "photo_420_q90": encode(photo(500, 375, 1), quality=90),
        "photo_444_q95": encode(photo(500, 375, 2), quality=95, subsampling=0),
        "photo_422_q85": encode(photo(480, 320, 3), quality=85, subsampling=1),
        "odd_size_420": encode(photo(333, 251, 4), quality=90),
        "grey": encode(photo(320, 240, 5, grey=True), quality=90),
        "progressive": encode(photo(400, 300, 6), quality=85, progressive=True),
        "optimized_huffman": encode(photo(400, 300, 7), quality=75, optimize=True),
        "exif_orientation_6": with_orientation(photo(400, 300, 8), 6, quality=90),
        "exif_orientation_3": with_orientation(photo(300, 200, 9), 3, quality=90),
        "exif_orientation_8": with_orientation(photo(400, 300, 13), 8, quality=90),
        "exif_orientation_5": with_orientation(photo(310, 270, 14), 5, quality=90),
        # Portrait: the crop cuts rows, which the decode skips above and stops before below.
        "portrait_420": encode(photo(375, 500, 15), quality=90),
        "restart_markers": encode(photo(420, 300, 16), quality=90, restart_marker_rows=1),
        "chroma_411": encode(photo(400, 300, 17), quality=90, subsampling="4:1:1"),
        # Upscaled (smaller than every resize target) and strongly downscaled (many taps).
        "small_upscaled": encode(photo(60, 45, 10), quality=90),
        "large_downscaled": encode(photo(1600, 1200, 11), quality=90),
        # Lossless, with alpha dropped by convert("RGB"): the resize alone.
        "rgba_png": encode(photo(210, 170, 12).convert("RGBA"), "PNG"),
        # Much taller than wide (a phone screenshot): Pillow 13 resizes these vertically
        # first; and one whose width grows while its height shrinks.
        "tall_phone_420": encode(photo(540, 1200, 18), quality=90),
        "tall_narrow_png": encode(photo(130, 700, 19), "PNG"),
        "narrow_upscaled_width": encode(photo(60, 300, 20), "PNG"),
        "damaged_scan": damaged(encode(photo(320, 240, 21), quality=90)),
        "exif_first_of_two": two_exif(with_orientation(photo(330, 250, 22), 6, quality=90), 3),
        # CMYK as PIL writes it (Adobe's inverted values); read back and converted as PIL does.
        "cmyk": encode(photo(300, 220, 23).convert("CMYK"), quality=90),
        # Other formats and modes, each through PIL's convert("RGB").
        "palette_png": encode(photo(200, 150, 24).quantize(64), "PNG"),
        "palette_trns_png": encode(palette_with_transparency(photo(200, 150, 25)), "PNG"),
        "grey_alpha_png": encode(photo(180, 140, 26).convert("LA"), "PNG"),
        "bilevel_png": encode(photo(180, 140, 27).convert("1"), "PNG"),
        "rgb16_png": png16(photo(160, 120, 28), seed=28),
        "gif": encode(photo(200, 150, 29).quantize(128), "GIF"),
        "gif_transparent": encode(photo(200, 150, 36).quantize(32), "GIF", transparency=3),
        "gif_offset": gif_offset(encode(photo(120, 80, 37).quantize(32), "GIF", transparency=3, background=5),
                                 (200, 150), (31, 17)),
        "gif_offset_opaque": gif_offset(encode(photo(120, 80, 38).quantize(32), "GIF"), (160, 130), (9, 40)),
        "gif_past_screen": gif_offset(encode(photo(120, 80, 39).quantize(32), "GIF"), (100, 90), (20, 30)),
        "bmp": encode(photo(203, 150, 30), "BMP"),
        "tiff": encode(photo(200, 151, 31), "TIFF"),
        "tiff_lzw": encode(photo(200, 150, 32), "TIFF", compression="tiff_lzw"),
        "webp_lossless": encode(photo(200, 150, 33), "WEBP", lossless=True),
        "webp_lossy": encode(photo(200, 150, 34), "WEBP", quality=80),
        "ppm": encode(photo(120, 90, 35), "PPM"),
        "ppm_16bit": ppm_wide(photo(120, 90, 58), 65535, seed=58),
        "ppm_10bit": ppm_wide(photo(120, 90, 59), 1023, seed=59),
        "png_interlaced": interlaced_png(photo(150, 110, 43)),
        "png_palette_4bit": encode(photo(150, 110, 44).quantize(16), "PNG", bits=4),
        "png_grey_trns": encode(photo(150, 110, 45).convert("L"), "PNG", transparency=100),
        "bmp_rgba": encode(photo(150, 110, 46).convert("RGBA"), "BMP"),
        "bmp_palette": encode(photo(150, 110, 47).quantize(200), "BMP"),
        "tiff_lzw_predictor": encode(photo(150, 110, 48), "TIFF", compression="tiff_lzw", predictor=2),
        "tiff_jpeg": encode(photo(160, 112, 49), "TIFF", compression="jpeg", quality=90),
        "tiff_cmyk": encode(photo(150, 110, 50).convert("CMYK"), "TIFF"),
        "tiff_deflate": encode(photo(150, 110, 51), "TIFF", compression="tiff_adobe_deflate"),
        "webp_alpha": encode(photo(150, 110, 52).convert("RGBA"), "WEBP", quality=80),
        "webp_animated": animated_webp(photo(150, 110, 54), photo(150, 110, 55)),
        "png_no_iend": without_iend(encode(photo(150, 110, 62), "PNG")),
        "png_bad_idat_crc": bad_idat_crc(encode(photo(150, 110, 63), "PNG")),
        # Where PIL reads a tag other readers miss or take differently: an EXIF block split over
        # two APP1 segments (its IFD in the second), a RATIONAL tag (6/1), a BYTE tag (bytes
        # to PIL: no turn), a PNG's tEXt "exif", an eXIf after an APNG's later frames (PIL
        # stops at the next frame: no turn), a WebP EXIF chunk its VP8X flags do not announce
        # (libwebp drops it: no turn), a TIFF's XMP (tag 700).
        "jpeg_exif_split_6": jpeg_app1(encode(photo(150, 110, 64), quality=90), [
            b"Exif\x00\x00MM\x00*\x00\x00\x00\x0c\x00\x00\x00\x00",
            b"Exif\x00\x00" + struct.pack(">HHHI", 1, 0x0112, 3, 1) + struct.pack(">HH", 6, 0) + bytes(4)]),
        "jpeg_exif_rational_6": encode(photo(150, 110, 65), quality=90, exif=b"Exif\x00\x00" + ifd0(
            [(0x0112, 5, 1, struct.pack(">I", 26))], pad=struct.pack(">II", 6, 1))),
        "jpeg_exif_byte_6": encode(photo(150, 110, 66), quality=90, exif=b"Exif\x00\x00" + ifd0(
            [(0x0112, 1, 1, b"\x06\x00\x00\x00")])),
        "png_text_exif_6": png_before_iend(encode(photo(150, 110, 67), "PNG"),
                                           png_chunk(b"tEXt", b"exif\x00" + ifd0([(0x0112, 3, 1, b"\x00\x06\x00\x00")]))),
        "apng_exif_after_frames": png_before_iend(
            encode(photo(150, 110, 68), "PNG", save_all=True, append_images=[photo(150, 110, 69)], duration=100),
            png_chunk(b"eXIf", ifd0([(0x0112, 3, 1, b"\x00\x06\x00\x00")]))),
        "webp_exif_unannounced": (lambda d: d[:20] + bytes([d[20] & ~0x08]) + d[21:])(
            encode(photo(150, 110, 70), "WEBP", lossless=True, exif=orientation_exif(6))),
        "tiff_xmp_6": encode(photo(150, 110, 71), "TIFF", tiffinfo={700: XMP.format(6).encode()}),
        # A PNG cut in its last checksum, in its zlib stream's checksum, or ending in stray bytes:
        # PIL reads the image all the same.
        "png_cut_in_crc": encode(photo(150, 110, 72), "PNG")[:-16],
        "png_cut_in_adler32": encode(photo(150, 110, 73), "PNG")[:-18],
        "png_stray_bytes": encode(photo(150, 110, 74), "PNG")[:-12] + b"abc",
        "bmp_os2_24bit": os2_bmp_24(photo(152, 110, 75)),
        "bmp_rgb555": bmp16(photo(151, 110, 60), 5),
        "bmp_rgb565": bmp16(photo(151, 110, 61), 6),
        "webp_animated_blend": blend_first_frame(animated_webp(photo(150, 110, 58), photo(150, 110, 59))),
        "gif_animated": animated_gif(photo(150, 110, 56), photo(150, 110, 57)),
        # EXIF orientation outside JPEG: a PNG's eXIf chunk, a WebP's EXIF chunk, a TIFF tag.
        "png_exif_6": encode(photo(150, 110, 40), "PNG", exif=orientation_exif(6)),
        "webp_exif_8": encode(photo(150, 110, 41), "WEBP", lossless=True, exif=orientation_exif(8)),
        "tiff_orientation_3": encode(photo(150, 110, 42), "TIFF", tiffinfo={0x0112: 3}),
        # Orientation where fewer readers look, as PIL finds it: a LONG tag, XMP only (JPEG,
        # PNG iTXt, WebP), ImageMagick's raw profile in a PNG, a PNG's eXIf after the pixels.
        "jpeg_exif_long_6": encode(photo(150, 110, 43), quality=90, exif=long_orientation_exif(6)),
        "jpeg_xmp_8": encode(photo(150, 110, 44), quality=90, xmp=XMP.format(8).encode()),
        "png_xmp_3": png_text(photo(150, 110, 45), "XML:com.adobe.xmp", XMP.format(3), itxt=True),
        "webp_xmp_6": encode(photo(150, 110, 46), "WEBP", lossless=True, xmp=XMP.format(6)),
        "png_raw_profile_6": png_text(photo(150, 110, 47), "Raw profile type exif", raw_profile_exif(6)),
        "png_exif_after_idat_5": exif_after_idat(encode(photo(150, 110, 48), "PNG", exif=orientation_exif(5))),
    }
    index = []
    for name, data in cases.items():
        magic = {b"\x89PNG": "png", b"GIF8": "gif", b"BM": "bmp", b"II*\x00": "tif", b"MM\x00*": "tif",
                 b"RIFF": "webp", b"P6": "ppm"}
        ext = next((e for m, e in magic.items() if data.startswith(m)), "jpg")
        with open(os.path.join(out, f"{name}.{ext}"), "wb") as f:
            f.write(data)
        im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        with open(os.path.join(out, name + ".rgb"), "wb") as f:
            f.write(np.asarray(im).tobytes())
        for t, (size, crop) in TRANSFORMS.items():
            x = TF.resize(im, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            if crop is not None:
                x = TF.center_crop(x, crop)
            with open(os.path.join(out, f"{name}.{t}.rgb"), "wb") as f:
                f.write(np.asarray(x).tobytes())
        index.append({"name": name, "file": f"{name}.{ext}", "w": im.width, "h": im.height,
                      "tolerance": KNOWN_DIFFERENCES.get(name, 0)})
    # Files PIL refuses (checked here): the decode stage must refuse them too.
    refused = {"jpeg_tail_marker": tail_marker(encode(photo(300, 480, 40), quality=90))}
    refused_index = []
    for name, data in refused.items():
        try:
            ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        except OSError as e:
            pil_error = str(e)
        else:
            raise SystemExit(f"{name}: PIL reads it, so it is no refused case")
        with open(os.path.join(out, f"{name}.jpg"), "wb") as f:
            f.write(data)
        refused_index.append({"name": name, "file": f"{name}.jpg", "pil_error": pil_error})
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump({"transforms": TRANSFORMS, "cases": index, "refused": refused_index}, f, indent=1)
    print(f"{len(index)} decode cases in {out}")


if __name__ == "__main__":
    main()
