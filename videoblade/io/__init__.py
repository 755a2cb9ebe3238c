"""Files users' other tools read: `video.py` (mp4/GIF write, mp4 read); `lora.py` (LoRA save/load/export)."""

from videoblade.io.video import read_video, to_uint8_frames, video_info, write_gif, write_video

__all__ = ["read_video", "to_uint8_frames", "video_info", "write_gif", "write_video"]
