"""A small 2-D kinematic skeleton that poses an abstract human figure.

Angles are in degrees in a y-up frame; a figure is built in head units and only
at the end scaled and placed in pixel space (x right, y down).  Side-view poses
are built facing +x and mirrored for "facing left"; front-view poses are never
mirrored because a mirrored front view would swap the person's left and right.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BODY = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
         "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
         "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]
_FEET = ["left_big_toe", "left_small_toe", "left_heel",
         "right_big_toe", "right_small_toe", "right_heel"]
_FINGERS = ("thumb", "index", "middle", "ring", "pinky")


def _hand_names(side: str) -> list[str]:
    return [f"{side}_hand_wrist"] + [f"{side}_{f}{j}" for f in _FINGERS for j in range(1, 5)]


KEYPOINT_NAMES: tuple[str, ...] = tuple(
    _BODY + _FEET + [f"face_{i}" for i in range(68)] + _hand_names("left") + _hand_names("right"))
FACE, LEFT_HAND, RIGHT_HAND = 23, 91, 112


def _hand_bones(w: int) -> list[tuple[int, int]]:
    chains = [(w, w + 1 + 4 * f) for f in range(5)]
    return chains + [(w + 1 + 4 * f + j, w + 2 + 4 * f + j) for f in range(5) for j in range(3)]


# Bones the renderer scatters particles along, with a capsule radius in head units.
_BODY_BONES = {(5, 7): 0.2, (7, 9): 0.17, (6, 8): 0.2, (8, 10): 0.17, (11, 13): 0.28,
               (13, 15): 0.21, (12, 14): 0.28, (14, 16): 0.21, (5, 6): 0.14,
               (11, 12): 0.16, (5, 11): 0.14, (6, 12): 0.14}
_FOOT_BONES = {(15, 19): 0.1, (15, 17): 0.1, (19, 17): 0.08, (17, 18): 0.06,
               (16, 22): 0.1, (16, 20): 0.1, (22, 20): 0.08, (20, 21): 0.06}
_HAND = _hand_bones(LEFT_HAND) + _hand_bones(RIGHT_HAND)
BONES: tuple[tuple[int, int], ...] = tuple(list(_BODY_BONES) + list(_FOOT_BONES) + _HAND)
BONE_RADII: tuple[float, ...] = tuple(
    list(_BODY_BONES.values()) + list(_FOOT_BONES.values()) + [0.045] * len(_HAND))

# Proportions in head units; a standing figure is about eight heads tall.
HEAD_R, NECK, TORSO, SHOULDER_DROP = 0.55, 0.25, 2.9, 0.15
SPINE = TORSO - SHOULDER_DROP  # shoulder-midpoint to hip-midpoint, independent of view
SHOULDER_W, HIP_W = 0.95, 0.55
UPPER_ARM, FOREARM, THIGH, SHIN, FOOT, HAND = 1.45, 1.2, 1.85, 1.75, 0.85, 0.85


def _unit(deg: float) -> np.ndarray:
    r = np.radians(deg)
    return np.array([np.cos(r), np.sin(r)])


def _face_template() -> np.ndarray:
    """68 iBUG points plus two ears on a unit head sphere: (u=subject's left, v=up, w=out)."""
    t = np.linspace(0.0, np.pi, 17)
    jaw = np.stack([-0.86 * np.cos(t), 0.1 - np.sin(t)], 1)
    b = np.linspace(0.0, 1.0, 5)
    arch = 0.36 + 0.08 * np.sin(np.pi * b)
    brows = [np.stack([x0 + 0.52 * b, arch], 1) for x0 in (-0.72, 0.2)]
    bridge = np.stack([np.zeros(4), np.linspace(0.22, -0.2, 4)], 1)
    nose = np.stack([np.linspace(-0.18, 0.18, 5), [-0.28, -0.31, -0.33, -0.31, -0.28]], 1)
    ea = np.radians([180, 120, 60, 0, -60, -120])
    eyes = [np.stack([cx + 0.15 * np.cos(ea), 0.2 + 0.06 * np.sin(ea)], 1) for cx in (-0.36, 0.36)]
    mo, mi = np.radians(np.arange(180, -180, -30)), np.radians(np.arange(180, -180, -45))
    outer = np.stack([0.3 * np.cos(mo), -0.55 + 0.12 * np.sin(mo)], 1)
    inner = np.stack([0.2 * np.cos(mi), -0.55 + 0.04 * np.sin(mi)], 1)
    uv = np.concatenate([jaw, *brows, bridge, nose, *eyes, outer, inner])
    w = np.sqrt(np.clip(1.0 - (uv ** 2).sum(1), 0.05, 1.0))
    w[27:31] += [0.05, 0.1, 0.17, 0.25]  # the nose sticks out so profiles show it
    w[31:36] += 0.1
    ears = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    return np.concatenate([np.column_stack([uv, w]), ears])


_FACE_TEMPLATE = _face_template()
# (palm length, offset toward the thumb side, fan angle, three phalanx lengths) per finger
_FINGER_GEOMETRY = ((0.40, 0.11, 9, (0.20, 0.12, 0.09)), (0.42, 0.035, 2, (0.22, 0.14, 0.10)),
                    (0.40, -0.04, -5, (0.20, 0.13, 0.09)), (0.36, -0.11, -12, (0.16, 0.10, 0.08)))


def _hand(wrist: np.ndarray, angle: float, thumb_sign: float, curl: float, spread: float) -> np.ndarray:
    """21 hand points fanned out from the wrist along the forearm direction."""
    d = _unit(angle)
    side = np.array([-d[1], d[0]]) * thumb_sign
    pts = [np.zeros(2)]
    shrink = 1.0 - 0.55 * curl  # curled fingers fold out of the image plane and look shorter

    def chain(start: np.ndarray, fan: float, lengths, bend: float) -> list[np.ndarray]:
        out, p, a = [], start, fan
        for ln in lengths:
            p = p + ln * shrink * _unit(a)
            out.append(p)
            a -= bend
        return out

    pts.append(np.array([0.08, 0.08]))
    pts += chain(pts[-1], 40 * spread + 10, (0.17, 0.14, 0.12), 15 + 20 * curl)
    for palm, off, fan, lengths in _FINGER_GEOMETRY:
        mcp = np.array([palm, off])
        pts += [mcp] + chain(mcp, fan * spread - 25 * curl, lengths, 30 * curl)
    local = np.array(pts) * HAND
    return wrist + local[:, :1] * d + local[:, 1:] * side


@dataclass(frozen=True)
class PoseSpec:
    view: str  # "front" or "side"
    params: dict
    captions: tuple[str, ...]
    absolute: tuple[str, ...] = ()  # limbs ("arm"/"leg") whose angles are measured from world-down
    lying: bool = False


@dataclass(frozen=True)
class Pose:
    name: str
    keypoints: np.ndarray  # (133, 2) float64 pixel coordinates
    caption: str
    view: str
    facing: str  # "front", or "left"/"right": where the face points (where the head lies, if lying)


_LIMB_KEYS = ("sh", "el", "wr", "hip", "kn", "an", "curl", "spread")
_DEFAULTS = {
    # side: sh/hip are flexion (+ = forward), el >= 0 bends the forearm forward,
    # kn >= 0 bends the shin backward, an is the foot angle relative to the shin.
    "side": dict(lean=(-3, 3), head=(-5, 5), yaw=(65, 82), sh=(-8, 8), el=(5, 20), wr=(-10, 10),
                 hip=(-3, 3), kn=(0, 6), an=(85, 95), curl=(0.1, 0.4), spread=(0.5, 0.9)),
    # front: sh/hip are abduction (+ = away from the midline), el/kn + = outward.
    "front": dict(lean=(-3, 3), head=(-5, 5), yaw=(-12, 12), sh=(6, 14), el=(3, 12), wr=(-10, 10),
                  hip=(2, 6), kn=(-3, 0), an=(0, 0), curl=(0.1, 0.4), spread=(0.5, 0.9)),
}
_S, _F = "side", "front"
_STAND = ("{subj} standing upright with arms relaxed at its sides, {facing}",
          "{subj} standing still, arms hanging loosely, {facing}")
# Each pose name maps to variants; "_a" parameters belong to the limb the caption calls {side}.
POSES: dict[str, tuple[PoseSpec, ...]] = {
    "standing": (PoseSpec(_F, {}, _STAND), PoseSpec(_S, {}, _STAND)),
    "walking": (PoseSpec(_S, dict(hip_a=(18, 30), kn_a=(3, 12), hip_b=(-22, -12), kn_b=(15, 30), an_b=(95, 110),
                                  sh_a=(-30, -15), sh_b=(15, 30), el=(15, 35)),
                         ("{subj} walking with its {side} leg stepping forward, arms swinging, {facing}",
                          "{subj} mid-stride, {side} foot forward, {facing}")),),
    "running": (PoseSpec(_S, dict(lean=(12, 22), head=(-10, 0), hip_a=(55, 75), kn_a=(70, 100), hip_b=(-30, -15),
                                  kn_b=(80, 110), an_b=(60, 80), sh_a=(-45, -30), sh_b=(40, 60), el=(80, 100)),
                         ("{subj} running hard, leaning forward with elbows bent, {facing}",
                          "{subj} sprinting, {side} knee driving up, {facing}")),),
    "sitting_ground": (PoseSpec(_S, dict(lean=(0, 15), head=(0, 15), hip=(120, 135), kn=(100, 120),
                                         sh=(35, 55), el=(10, 40)),
                                ("{subj} sitting on the ground with knees drawn up, arms resting on the knees, {facing}",
                                 "{subj} seated on the floor with raised knees, forearms over them, {facing}")),),
    "sitting_chair": (PoseSpec(_S, dict(lean=(-8, 5), head=(-5, 10), hip=(85, 100), kn=(80, 100), sh=(15, 35),
                                        el=(50, 80)),
                               ("{subj} sitting on an invisible chair, hands resting in its lap, {facing}",
                                "{subj} seated upright on an unseen chair, thighs level and shins upright, {facing}")),),
    "sitting_cross_legged": (PoseSpec(_F, dict(hip=(55, 70), kn=(-150, -130), sh=(15, 25), el=(5, 25)),
                                      ("{subj} sitting cross-legged on the floor, hands resting on its knees, {facing}",
                                       "{subj} seated with legs folded and crossed, {facing}")),),
    "lying_back": (PoseSpec(_S, dict(lean=(-95, -85), hip=(-5, 10), kn=(0, 15), sh=(5, 25), el=(0, 15)),
                            ("{subj} lying flat on its back, arms at its sides, {facing}",
                             "{subj} stretched out on its back, {facing}"), lying=True),
                   PoseSpec(_S, dict(lean=(-95, -85), hip_a=(40, 60), kn_a=(70, 95), an_a=(75, 95), hip_b=(-5, 5),
                                     kn_b=(0, 10), sh=(150, 170), el=(125, 145)),
                            ("{subj} lying on its back with the {side} knee raised, arms behind its head, {facing}",),
                            lying=True)),
    "lying_curled": (PoseSpec(_S, dict(lean=(-105, -75), head=(15, 30), hip=(95, 115), kn=(145, 160),
                                            an=(40, 70), sh=(30, 45), el=(10, 40)),
                                   ("{subj} lying curled up, hugging its knees to its chest, {facing}",
                                    "{subj} curled up on the ground with knees drawn in, {facing}"), lying=True),),
    "dancing": (PoseSpec(_F, dict(lean=(-12, 12), sh_a=(130, 165), el_a=(10, 40), sh_b=(40, 80), el_b=(-100, -60),
                                  hip_a=(3, 8), hip_b=(20, 35), kn_b=(-50, -25), curl=(0, 0.2)),
                         ("{subj} dancing with its {side} arm flung overhead and hips swaying, {facing}",
                          "{subj} caught mid-dance, one arm raised high and one knee bent, {facing}")),
                PoseSpec(_S, dict(lean=(-10, 5), sh_a=(140, 170), el_a=(20, 50), sh_b=(-50, -30), el_b=(30, 60),
                                  hip_a=(30, 50), kn_a=(40, 70), an_b=(50, 70)),
                         ("{subj} dancing on its toes, {side} knee lifted and {side} arm swept up, {facing}",))),
    "reaching_up": (PoseSpec(_F, dict(sh=(160, 178), el=(0, 12), curl=(0, 0.2), spread=(0.8, 1.0)),
                             ("{subj} reaching straight up with both arms stretched overhead, {facing}",)),
                    PoseSpec(_S, dict(head=(-25, -10), sh=(145, 165), el=(0, 10), an=(40, 60), curl=(0, 0.2)),
                             ("{subj} reaching up high on tiptoe, arms stretched overhead, {facing}",))),
    "reaching_forward": (PoseSpec(_S, dict(lean=(15, 35), head=(-15, 0), sh=(95, 115), el=(0, 10), hip_a=(20, 35),
                                           hip_b=(0, 10), kn_b=(0, 10), curl=(0, 0.2), spread=(0.8, 1.0)),
                                  ("{subj} leaning forward, both arms extended straight ahead, {facing}",
                                   "{subj} reaching forward as if for something just out of reach, {facing}")),),
    "bending_over": (PoseSpec(_S, dict(lean=(115, 135), head=(-10, 20), hip=(3, 12), kn=(0, 10), sh=(-35, -22),
                                       el=(0, 15)),
                              ("{subj} bending over at the waist, arms dangling toward the floor, {facing}",
                               "{subj} bent forward with straight legs, reaching toward its toes, {facing}"),
                              absolute=("arm", "leg")),),
    "kneeling": (PoseSpec(_S, dict(lean=(-5, 8), hip=(-5, 5), kn=(85, 95), an=(0, 20), sh=(-5, 15), el=(20, 60)),
                          ("{subj} kneeling upright on both knees, hands resting on the thighs, {facing}",),
                          absolute=("leg",)),
                 PoseSpec(_S, dict(lean=(-5, 10), hip_a=(80, 95), kn_a=(80, 100), an_a=(85, 95), hip_b=(-15, 0),
                                   kn_b=(85, 100), an_b=(0, 20), sh=(0, 20), el=(20, 50)),
                          ("{subj} kneeling on its {other} knee, {side} foot planted in front, {facing}",),
                          absolute=("leg",))),
    "crouching": (PoseSpec(_S, dict(lean=(30, 50), hip=(75, 95), kn=(140, 160), an=(135, 160), sh=(40, 80),
                                    el=(20, 60)),
                           ("{subj} crouching low with knees deeply bent, arms forward for balance, {facing}",
                            "{subj} squatting down on its heels, {facing}"), absolute=("arm", "leg")),),
    "jumping": (PoseSpec(_F, dict(sh=(125, 150), el=(0, 15), hip=(20, 32), kn=(-5, 0), curl=(0, 0.1),
                                  spread=(0.9, 1.0)),
                         ("{subj} leaping in a star jump, arms and legs spread wide, {facing}",)),
                PoseSpec(_S, dict(lean=(-5, 10), hip=(100, 120), kn=(120, 140), an=(40, 70), sh=(120, 150),
                                  el=(10, 30)),
                         ("{subj} jumping high with knees tucked up and arms thrown overhead, {facing}",),
                         absolute=("leg",))),
    "waving": (PoseSpec(_F, dict(sh_a=(95, 130), el_a=(50, 90), wr_a=(-15, 15), curl_a=(0, 0.1), spread_a=(0.9, 1.0)),
                        ("{subj} waving hello with its {side} hand raised, {facing}",
                         "{subj} standing and waving its {side} arm above the shoulder, {facing}")),),
    "arms_crossed": (PoseSpec(_F, dict(sh=(8, 16), el=(-120, -105), curl=(0.4, 0.7)),
                              ("{subj} standing with arms crossed over its chest, {facing}",
                               "{subj} standing with folded arms, {facing}")),),
    "hands_on_hips": (PoseSpec(_F, dict(sh=(38, 50), el=(-95, -75), wr=(-20, 0), hip=(5, 10)),
                               ("{subj} standing with both hands on its hips, elbows out, {facing}",
                                "{subj} in a confident stance, hands planted on its hips, {facing}")),),
    "stretching": (PoseSpec(_F, dict(lean=(12, 25), sh_b=(150, 175), el_b=(30, 60), sh_a=(10, 25), el_a=(-30, -5),
                                     hip=(4, 10)),
                            ("{subj} stretching sideways, its {other} arm arched over its head, {facing}",)),
                   PoseSpec(_F, dict(sh=(80, 95), el=(0, 10), spread=(0.9, 1.0), curl=(0, 0.1), hip=(4, 10)),
                            ("{subj} stretching its arms out wide to the sides, {facing}",))),
    "kicking": (PoseSpec(_S, dict(lean=(-20, -5), hip_a=(70, 100), kn_a=(0, 15), an_a=(60, 90), sh_a=(30, 60),
                                  sh_b=(-40, -10), el=(20, 40)),
                         ("{subj} kicking its {side} leg high in front, {facing}",)),),
    "balancing": (PoseSpec(_F, dict(hip_a=(45, 60), kn_a=(-140, -120), hip_b=(0, 3), kn_b=(-2, 0), sh=(160, 178),
                                    el=(0, 20)),
                           ("{subj} balancing on its {other} leg in a tree pose, arms raised overhead, {facing}",)),),
    "plank": (PoseSpec(_S, dict(lean=(72, 80), head=(-10, 10), sh=(-5, 10), el=(0, 5), wr=(75, 90), kn=(0, 5),
                                an=(60, 80)),
                       ("{subj} holding a plank, body straight and arms locked under the shoulders, {facing}",),
                       absolute=("arm",)),),
    "crawling": (PoseSpec(_S, dict(lean=(68, 78), sh_a=(5, 20), sh_b=(-10, 0), el=(0, 15), wr=(80, 90), hip=(-5, 5),
                                   kn=(85, 95), an=(0, 20)),
                          ("{subj} crawling on hands and knees, {facing}",
                           "{subj} on all fours, {side} hand reaching ahead, {facing}"), absolute=("arm", "leg")),),
}
POSE_NAMES: tuple[str, ...] = tuple(POSES)
_SUBJECTS = ("a figure", "a human figure", "an abstract figure", "a dotted figure", "a particle figure")


def _skeleton(view: str, p: dict, lat: float, dep: float, absolute: tuple[str, ...]) -> np.ndarray:
    """133 points in head units, y up, side views facing +x.

    lat/dep project the person's left-right and front-back axes onto image x; they
    carry the yaw so the face, ears and shoulders agree on how far the body is turned.
    """
    kp = np.zeros((133, 2))
    torso = 90.0 - p["lean"]
    t = _unit(torso)
    fwd = np.array([t[1], -t[0]])
    neck = t * TORSO
    up = _unit(torso - p["head"])
    right = np.array([up[1], -up[0]])
    centre = neck + up * (NECK + HEAD_R)
    x = _FACE_TEMPLATE[:, 0] * lat + _FACE_TEMPLATE[:, 2] * dep
    head = centre + HEAD_R * (x[:, None] * right + _FACE_TEMPLATE[:, 1:2] * up)
    kp[FACE:FACE + 68], kp[3], kp[4] = head[:68], head[68], head[69]
    kp[0], kp[1], kp[2] = head[30], head[42:48].mean(0), head[36:42].mean(0)
    front = view == "front"
    base_arm = -90.0 if "arm" in absolute else torso - 180.0
    base_leg = -90.0 if "leg" in absolute else torso - 180.0
    for k, (side, m) in enumerate((("l", 1.0), ("r", -1.0))):
        def g(key: str) -> float:
            return p[f"{key}_{side}"]
        mm = m if front else 1.0  # front-view angles mirror between the two sides
        shoulder = neck - t * SHOULDER_DROP + fwd * (m * lat * SHOULDER_W)
        hip = fwd * (m * lat * HIP_W)
        upper = base_arm + mm * g("sh")
        fore = upper + mm * g("el")
        elbow = shoulder + UPPER_ARM * _unit(upper)
        wrist = elbow + FOREARM * _unit(fore)
        thigh = base_leg + mm * g("hip")
        shin = thigh + (m * g("kn") if front else -g("kn"))  # side-view knees only bend backward
        knee = hip + THIGH * _unit(thigh)
        ankle = knee + SHIN * _unit(shin)
        kp[[5 + k, 7 + k, 9 + k, 11 + k, 13 + k, 15 + k]] = shoulder, elbow, wrist, hip, knee, ankle
        sd = _unit(shin)
        if front:  # feet point at the viewer, so they show as short stubs below the ankle
            lateral = np.array([-sd[1], sd[0]]) * m
            feet = (0.45 * sd - 0.05 * lateral, 0.38 * sd + 0.2 * lateral, 0.3 * sd)
        else:
            fd = _unit(shin + g("an"))
            feet = (fd + 0.3 * sd, 0.78 * fd + 0.33 * sd, 0.3 * sd - 0.22 * fd)
        kp[17 + 3 * k:20 + 3 * k] = ankle + FOOT * np.array(feet)
        hand = LEFT_HAND if k == 0 else RIGHT_HAND
        kp[hand:hand + 21] = _hand(wrist, fore + mm * g("wr"), mm, g("curl"), g("spread"))
    return kp


def _place(kp: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Scale and move a head-unit figure into the image, flipping y, with room for the head and limb width."""
    centre = (kp[3] + kp[4]) / 2
    ext = np.concatenate([kp, centre + HEAD_R * np.array([[1, 0], [-1, 0], [0, 1], [0, -1]])])
    lo, hi = ext.min(0) - 0.4, ext.max(0) + 0.4
    size = hi - lo
    margin = 0.03 * min(width, height)
    avail = np.array([width, height], float) - 2 * margin
    scale = (avail / size).min() * rng.uniform(0.6, 0.95)
    off = margin + rng.uniform(0.0, 1.0, 2) * (avail - size * scale)
    return np.column_stack([(kp[:, 0] - lo[0]) * scale + off[0], (hi[1] - kp[:, 1]) * scale + off[1]])


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def sample_pose(rng: np.random.Generator, width: int, height: int, name: str | None = None) -> Pose:
    """Draw a pose (random unless name is given) and place it inside a width x height image."""
    name = name if name is not None else _pick(rng, POSE_NAMES)
    variants = POSES[name]
    spec = variants[int(rng.integers(len(variants)))]
    ranges = {**_DEFAULTS[spec.view], **spec.params}
    p = {key: rng.uniform(*ranges[key]) for key in ("lean", "head", "yaw")}
    ab = {f"{key}_{x}": rng.uniform(*ranges.get(f"{key}_{x}", ranges[key])) for key in _LIMB_KEYS for x in "ab"}
    swapped = bool(rng.random() < 0.5)
    for key in _LIMB_KEYS:
        a, b = ab[f"{key}_a"], ab[f"{key}_b"]
        p[f"{key}_l"], p[f"{key}_r"] = (b, a) if swapped else (a, b)
    yaw = np.radians(p["yaw"])
    if spec.view == "front":
        if swapped:  # moving the "a" role to the right side mirrors the whole pose
            p["lean"], p["head"], yaw = -p["lean"], -p["head"], -yaw
        s, lat = 1.0, np.cos(yaw)
    else:
        s = 1.0 if rng.random() < 0.5 else -1.0
        lat = s * np.cos(yaw)  # the mirror below flips this back, keeping left/right labels true
    kp = _skeleton(spec.view, p, lat, np.sin(yaw), spec.absolute)
    kp[:, 0] *= s
    px = _place(kp, width, height, rng)

    if spec.view == "front":
        facing = "front"
        phrase = _pick(rng, ("facing the viewer", "seen from the front", "facing forward"))
    elif spec.lying:
        facing = "left" if px[3:5, 0].mean() < px[11:13, 0].mean() else "right"
        phrase = _pick(rng, ("head to the {d}", "with its head toward the {d}")).format(d=facing)
    else:
        facing = "right" if s > 0 else "left"
        phrase = _pick(rng, ("facing {d}", "turned to the {d}", "in profile facing {d}")).format(d=facing)
    sides = ("right", "left") if swapped else ("left", "right")
    caption = _pick(rng, spec.captions).format(
        subj=_pick(rng, _SUBJECTS), facing=phrase, side=sides[0], other=sides[1])
    if rng.random() < 0.25:
        caption += _pick(rng, (", drawn in sparse black dots on white", ", made of scattered dark specks"))
    return Pose(name, px, caption, spec.view, facing)
