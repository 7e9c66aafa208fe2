"""The demo's bundled data: short medical conversations, English and Chinese, written from a fact table.

    python -m medcare.demo.make_data            # rewrites stage1.jsonl, stage2.jsonl, eval.jsonl beside this file
    python -m medcare.demo.make_data --check    # exit 1 when the files are not what the generator writes

Everything comes from `FACTS`, a hand-written table of common conditions, each with a standard drug, a
typical symptom, a key test, its body system and some synonyms, in both languages. Templates turn it into:

* ``stage1.jsonl``: knowledge (multiple-choice questions whose reply explains briefly and ends with
  "The answer is B." / "答案为B。", a few with two correct letters) mixed with alignment tasks;
* ``stage2.jsonl``: alignment tasks only (entity extraction from a short clinical note in a fixed output
  format, term normalisation, intent classification over a fixed label set), none of them in stage 1;
* ``eval.jsonl``: held-out single-answer multiple-choice questions in the plain evaluation format
  ``{"question", "options", "answer", "task", "type": "knowledge", "fact"}`` (``options`` a letter -> text
  dict, or a list for some), plus ``messages``: the same question as a conversation (the `format_mcq` prompt
  and the reference reply), so that this file too passes ``python -m medcare.data check``. Each asks a fact
  that stage 1 teaches (the same question kind, condition and language, TAUGHT times) in words training never
  uses (EVAL_QUESTIONS), with distractors from none of the conditions those stage-1 questions offered and its
  answer on another letter: a model can only score by having learned the fact, not the question.

Training records use both formats (``conversations`` with human/gpt, ``messages`` with user/assistant), some
with a system turn, and carry ``id``, ``task``, ``lang`` (and ``answer`` and ``fact``, the condition asked
about, for questions), which loaders ignore.
A multiple-choice prompt is `format_mcq` of the question and its options; an evaluation should use the same.
Output is deterministic: one seeded ``random.Random``, no set iteration, fixed JSON formatting.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FACTS", "FILES", "MAX_WORDS", "SEED", "Fact", "Terms", "alignment_pool", "answer_sentence", "format_mcq",
           "generate", "is_chinese", "main", "question_pool", "render", "write"]

SEED = 20240611
DEMO_DIR = Path(__file__).resolve().parent
FILES = ("stage1.jsonl", "stage2.jsonl", "eval.jsonl", "eval_align.jsonl")
# Records per file and kind, split evenly between English and Chinese.
STAGE1_MCQ, STAGE1_ALIGN, STAGE2_ALIGN, EVAL_MCQ, EVAL_ALIGN = 220, 80, 150, 60, 60
MULTI_FRACTION = 0.1  # of the multiple-choice questions, those with two correct letters
ALIGN_SHARES = (("extract", 0.4), ("normalise", 0.25), ("intent", 0.35))
LANGS = ("en", "zh")
LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Terms:
    """A condition's terms in one language. None: no single standard drug / test (surgery, clinical diagnosis).
    Symptoms and tests never contain the list separators of the extraction format (", " and "，")."""

    condition: str
    drug: str | None
    symptom: str
    test: str | None
    aliases: tuple[str, ...] = ()  # synonyms, abbreviations and colloquial names -> `condition`


@dataclass(frozen=True)
class Fact:
    """One condition. ``near``: conditions whose drug, symptom or test could also be right for this one (never
    used as each other's distractors; symmetric). ``systems``: the body systems it mainly affects, first the
    primary one (none: no system questions). ``ages``/``sex``: who the clinical notes describe."""

    key: str
    systems: tuple[str, ...]
    en: Terms
    zh: Terms
    near: tuple[str, ...] = ()
    ages: tuple[int, int] = (25, 75)
    sex: str | None = None

    def terms(self, lang: str) -> Terms:
        return self.en if lang == "en" else self.zh


SYSTEMS = {  # key -> (English, Chinese)
    "cardiovascular": ("cardiovascular system", "心血管系统"), "respiratory": ("respiratory system", "呼吸系统"),
    "digestive": ("digestive system", "消化系统"), "endocrine": ("endocrine system", "内分泌系统"),
    "nervous": ("nervous system", "神经系统"), "musculoskeletal": ("musculoskeletal system", "肌肉骨骼系统"),
    "urinary": ("urinary system", "泌尿系统"), "blood": ("blood (haematological system)", "血液系统"),
    "skin": ("skin", "皮肤"), "eye": ("eye", "眼"), "immune": ("immune system", "免疫系统"),
    "mental": ("mind (mental health)", "精神心理"),
}


def _fact(key, systems, en, zh, near=(), ages=(25, 75), sex=None) -> Fact:
    return Fact(key, tuple(systems), Terms(*en), Terms(*zh), tuple(near), ages, sex)


_ANTITHROMBOTIC = ("atrial_fibrillation", "myocardial_infarction", "dvt", "stroke")
FACTS: tuple[Fact, ...] = (
    _fact("hypertension", ["cardiovascular"],
          ("hypertension", "amlodipine", "headache and dizziness", "repeated blood pressure measurement",
           ("HTN", "high blood pressure")),
          ("高血压", "氨氯地平", "头痛头晕", "多次血压测量", ("高血压病", "血压高")),
          near=["migraine", "stroke", "heart_failure", "bph"], ages=(40, 80)),
    _fact("t2dm", ["endocrine"],
          ("type 2 diabetes", "metformin", "excessive thirst and frequent urination", "HbA1c",
           ("T2DM", "adult-onset diabetes")),
          ("2型糖尿病", "二甲双胍", "多饮多尿", "糖化血红蛋白", ("二型糖尿病", "非胰岛素依赖型糖尿病")),
          near=["hypoglycemia", "uti", "bph"], ages=(40, 80)),
    _fact("asthma", ["respiratory"],
          ("asthma", "salbutamol", "episodic wheezing", "spirometry", ("bronchial asthma",)),
          ("支气管哮喘", "沙丁胺醇", "发作性喘息", "肺功能检查", ("哮喘", "哮喘病")),
          near=["anaphylaxis", "allergic_rhinitis", "heart_failure"], ages=(8, 60)),
    _fact("peptic_ulcer", ["digestive"],
          ("peptic ulcer disease", "omeprazole", "burning upper abdominal pain related to meals", "gastroscopy",
           ("PUD",)),
          ("消化性溃疡", "奥美拉唑", "与进食相关的上腹烧灼痛", "胃镜检查", ("溃疡病",)),
          near=["pancreatitis", "gallstones", "myocardial_infarction", "gastroenteritis"]),
    _fact("gout", ["musculoskeletal", "endocrine"],
          ("gout", "colchicine", "sudden painful swelling of the big-toe joint", "serum uric acid",
           ("gouty arthritis",)),
          ("痛风", "秋水仙碱", "第一跖趾关节突发红肿热痛", "血尿酸", ("痛风性关节炎",)),
          near=["rheumatoid_arthritis"], ages=(35, 75), sex="m"),
    _fact("hypothyroidism", ["endocrine"],
          ("hypothyroidism", "levothyroxine", "tiredness and feeling cold", "TSH", ("underactive thyroid",)),
          ("甲状腺功能减退症", "左甲状腺素", "乏力怕冷", "促甲状腺激素", ("甲减",)),
          near=["hyperthyroidism", "iron_deficiency_anemia", "b12_deficiency", "depression", "hepatitis_b",
                "alzheimers"]),
    _fact("hyperthyroidism", ["endocrine"],
          ("hyperthyroidism", "methimazole", "weight loss despite a good appetite", "free T4 and TSH",
           ("overactive thyroid",)),
          ("甲状腺功能亢进症", "甲巯咪唑", "多食消瘦", "甲状腺功能（FT4和TSH）", ("甲亢",)),
          near=["hypothyroidism", "atrial_fibrillation", "hypoglycemia", "t2dm", "gastroenteritis"]),
    _fact("atrial_fibrillation", ["cardiovascular"],
          ("atrial fibrillation", "warfarin", "irregular palpitations", "electrocardiogram", ("AF", "AFib")),
          ("心房颤动", "华法林", "心悸伴脉搏不齐", "心电图", ("房颤",)),
          near=[*_ANTITHROMBOTIC, "hyperthyroidism", "hypoglycemia", "heart_failure", "migraine"], ages=(55, 85)),
    _fact("migraine", ["nervous"],
          ("migraine", "sumatriptan", "throbbing one-sided headache", None, ("migraine headache",)),
          ("偏头痛", "舒马曲坦", "单侧搏动性头痛", None, ("偏头疼",)),
          near=["hypertension", "stroke", "epilepsy", "myocardial_infarction", "atrial_fibrillation"],
          ages=(18, 55)),
    _fact("pneumonia", ["respiratory"],
          ("community-acquired pneumonia", "amoxicillin", "fever with a productive cough", "chest X-ray",
           ("CAP",)),
          ("社区获得性肺炎", "阿莫西林", "发热伴咳嗽咳痰", "胸部X线检查", ("CAP",)),
          near=["tuberculosis", "influenza", "uti", "malaria", "heart_failure"]),
    _fact("epilepsy", ["nervous"],
          ("epilepsy", "sodium valproate", "recurrent seizures", "electroencephalogram (EEG)",
           ("seizure disorder",)),
          ("癫痫", "丙戊酸钠", "反复抽搐发作", "脑电图", ("羊角风", "癫痫病")),
          near=["migraine", "hypoglycemia", "stroke"], ages=(10, 60)),
    _fact("heart_failure", ["cardiovascular"],
          ("heart failure", "furosemide", "leg swelling and breathlessness", "echocardiography",
           ("CHF", "congestive heart failure")),
          ("心力衰竭", "呋塞米", "下肢水肿伴气促", "超声心动图", ("心衰", "心功能不全")),
          near=["hypertension", "myocardial_infarction", "dvt", "asthma", "atrial_fibrillation", "pneumonia"],
          ages=(55, 85)),
    _fact("uti", ["urinary"],
          ("urinary tract infection", "nitrofurantoin", "painful frequent urination", "urinalysis",
           ("UTI", "bladder infection")),
          ("尿路感染", "呋喃妥因", "尿频尿急尿痛", "尿常规", ("尿感", "泌尿系感染")),
          near=["pneumonia", "bph", "t2dm", "kidney_stones"], ages=(20, 70), sex="f"),
    _fact("iron_deficiency_anemia", ["blood"],
          ("iron deficiency anaemia", "ferrous sulfate", "tiredness and pale skin", "serum ferritin", ("IDA",)),
          ("缺铁性贫血", "硫酸亚铁", "乏力伴面色苍白", "血清铁蛋白", ()),
          near=["b12_deficiency", "hypothyroidism", "hepatitis_b", "malaria", "hypertension", "hypoglycemia",
                "peptic_ulcer"]),
    _fact("b12_deficiency", ["blood"],
          ("vitamin B12 deficiency anaemia", "vitamin B12 injections", "numb hands and feet with tiredness",
           "serum vitamin B12", ()),
          ("维生素B12缺乏性贫血", "维生素B12注射", "手足麻木伴乏力", "血清维生素B12测定", ()),
          near=["iron_deficiency_anemia", "hypothyroidism", "hepatitis_b", "alzheimers", "hypertension"],
          ages=(45, 85)),
    _fact("tuberculosis", ["respiratory"],
          ("pulmonary tuberculosis", "isoniazid", "chronic cough with night sweats",
           "sputum test for acid-fast bacilli", ("consumption",)),
          ("肺结核", "异烟肼", "长期咳嗽伴盗汗", "痰抗酸杆菌检查", ("肺痨",)),
          near=["pneumonia", "influenza", "malaria"]),
    _fact("parkinsons", ["nervous"],
          ("Parkinson's disease", "levodopa", "resting tremor", None, ("PD", "paralysis agitans")),
          ("帕金森病", "左旋多巴", "静止性震颤", None, ("震颤麻痹",)),
          near=["alzheimers"], ages=(55, 85)),
    _fact("rheumatoid_arthritis", ["musculoskeletal", "immune"],
          ("rheumatoid arthritis", "methotrexate", "morning stiffness of the small hand joints",
           "rheumatoid factor and anti-CCP antibodies", ("RA",)),
          ("类风湿关节炎", "甲氨蝶呤", "双手小关节晨僵", "类风湿因子和抗CCP抗体", ("类风关",)),
          near=["gout", "psoriasis", "lupus", "osteoporosis", "myocardial_infarction"], ages=(30, 70)),
    _fact("depression", ["mental", "nervous"],
          ("major depressive disorder", "sertraline", "persistent low mood and loss of interest",
           "PHQ-9 questionnaire", ("clinical depression", "MDD")),
          ("抑郁症", "舍曲林", "持续情绪低落伴兴趣减退", "PHQ-9抑郁量表", ("忧郁症",)),
          near=["hypothyroidism", "schizophrenia", "alzheimers"], ages=(18, 70)),
    _fact("myocardial_infarction", ["cardiovascular"],
          ("acute myocardial infarction", "aspirin", "crushing chest pain", "cardiac troponin",
           ("heart attack", "MI")),
          ("急性心肌梗死", "阿司匹林", "压榨性胸痛", "心肌肌钙蛋白", ("心梗", "急性心梗")),
          near=[*_ANTITHROMBOTIC, "heart_failure", "migraine", "peptic_ulcer", "pancreatitis",
                "rheumatoid_arthritis"], ages=(45, 85)),
    _fact("herpes_zoster", ["skin", "nervous"],
          ("herpes zoster", "acyclovir", "a painful band-like blistering rash", None, ("shingles",)),
          ("带状疱疹", "阿昔洛韦", "沿神经分布的带状水疱伴疼痛", None, ("缠腰龙", "蛇串疮")),
          ages=(50, 85)),
    _fact("influenza", ["respiratory"],
          ("influenza", "oseltamivir", "sudden high fever with muscle aches", "rapid influenza antigen test",
           ("flu",)),
          ("流行性感冒", "奥司他韦", "突发高热伴全身肌肉酸痛", "流感病毒抗原检测", ("流感",)),
          near=["pneumonia", "tuberculosis", "malaria", "myocardial_infarction"], ages=(5, 80)),
    _fact("allergic_rhinitis", ["respiratory", "immune"],
          ("allergic rhinitis", "loratadine", "sneezing with a clear runny nose", "allergen skin prick test",
           ("hay fever",)),
          ("变应性鼻炎", "氯雷他定", "打喷嚏伴流清涕", "过敏原皮肤点刺试验", ("过敏性鼻炎",)),
          near=["asthma", "anaphylaxis", "scabies"], ages=(8, 60)),
    _fact("osteoporosis", ["musculoskeletal", "endocrine"],
          ("osteoporosis", "alendronate", "fractures after minor falls", "bone density scan (DXA)", ()),
          ("骨质疏松症", "阿仑膦酸钠", "轻微外伤后骨折", "双能X线骨密度检测", ("骨松",)),
          near=["rheumatoid_arthritis"], ages=(60, 90), sex="f"),
    _fact("bph", ["urinary"],
          ("benign prostatic hyperplasia", "tamsulosin", "a weak urine stream and waking at night to urinate",
           "prostate ultrasound", ("BPH", "enlarged prostate")),
          ("良性前列腺增生", "坦索罗辛", "排尿费力伴夜尿增多", "前列腺超声", ("前列腺肥大", "前列腺增生症")),
          near=["uti", "hypertension", "t2dm", "kidney_stones"], ages=(55, 85), sex="m"),
    _fact("anaphylaxis", ["immune", "respiratory", "cardiovascular", "skin"],
          ("anaphylaxis", "intramuscular epinephrine", "hives with breathing difficulty and low blood pressure",
           "serum tryptase", ("anaphylactic reaction",)),
          ("严重过敏反应", "肌内注射肾上腺素", "荨麻疹伴呼吸困难和血压下降", "血清类胰蛋白酶", ()),
          near=["asthma", "allergic_rhinitis", "scabies"], ages=(10, 70)),
    _fact("hypoglycemia", ["endocrine"],
          ("hypoglycaemia", "glucose", "sweating with shakiness and palpitations", "blood glucose measurement",
           ("low blood sugar",)),
          ("低血糖症", "葡萄糖", "出汗手抖伴心慌", "血糖检测", ("低血糖",)),
          near=["t2dm", "epilepsy", "hyperthyroidism", "atrial_fibrillation", "hypertension", "stroke"]),
    _fact("dvt", ["cardiovascular"],
          ("deep vein thrombosis", "low-molecular-weight heparin", "one-sided leg swelling and pain",
           "compression ultrasound of the leg veins", ("DVT",)),
          ("深静脉血栓形成", "低分子肝素", "单侧下肢肿胀疼痛", "下肢静脉加压超声", ("深静脉血栓",)),
          near=[*_ANTITHROMBOTIC, "heart_failure"]),
    _fact("stroke", ["nervous", "cardiovascular"],
          ("acute ischaemic stroke", "alteplase", "sudden weakness on one side of the body", "head CT scan",
           ("cerebral infarction",)),
          ("急性缺血性脑卒中", "阿替普酶", "突发一侧肢体无力", "头颅CT", ("脑梗死", "脑梗")),
          near=[*_ANTITHROMBOTIC, "hypertension", "migraine", "epilepsy"], ages=(50, 85)),
    _fact("hepatitis_b", ["digestive"],
          ("chronic hepatitis B", "entecavir", "tiredness with yellowing of the skin and eyes",
           "hepatitis B surface antigen (HBsAg)", ("CHB",)),
          ("慢性乙型肝炎", "恩替卡韦", "乏力伴皮肤巩膜黄染", "乙肝表面抗原", ("慢性乙肝",)),
          near=["iron_deficiency_anemia", "b12_deficiency", "hypothyroidism", "gallstones", "pancreatitis"]),
    _fact("glaucoma", ["eye"],
          ("open-angle glaucoma", "latanoprost eye drops", "gradual loss of side vision",
           "intraocular pressure measurement", ()),
          ("开角型青光眼", "拉坦前列素滴眼液", "逐渐加重的周边视野缺损", "眼压测量", ()),
          near=["cataract"], ages=(45, 85)),
    _fact("malaria", [],
          ("malaria", "artemisinin-based combination therapy", "recurring fever with chills",
           "blood smear for malaria parasites", ("ague",)),
          ("疟疾", "青蒿素类复方制剂", "周期性寒战高热", "外周血涂片查疟原虫", ("打摆子",)),
          near=["pneumonia", "influenza", "tuberculosis", "iron_deficiency_anemia", "lupus"]),
    _fact("psoriasis", ["skin", "immune", "musculoskeletal"],
          ("psoriasis", "calcipotriol", "silvery scaly plaques on the elbows and knees", None, ()),
          ("银屑病", "卡泊三醇", "肘膝部银白色鳞屑性斑块", None, ("牛皮癣",)),
          near=["rheumatoid_arthritis", "scabies"]),
    _fact("acne", ["skin"],
          ("acne vulgaris", "adapalene", "blackheads and pimples on the face", None, ("acne",)),
          ("寻常痤疮", "阿达帕林", "面部粉刺和丘疹", None, ("痤疮", "青春痘")),
          ages=(14, 25)),
    _fact("schizophrenia", ["mental", "nervous"],
          ("schizophrenia", "risperidone", "hallucinations and delusions", None, ()),
          ("精神分裂症", "利培酮", "幻觉和妄想", None, ()),
          near=["depression", "alzheimers"], ages=(18, 45)),
    _fact("gallstones", ["digestive"],
          ("gallstones", None, "right upper abdominal pain after fatty meals", "abdominal ultrasound",
           ("cholelithiasis",)),
          ("胆囊结石", None, "进食油腻后右上腹痛", "腹部超声", ("胆结石",)),
          near=["peptic_ulcer", "pancreatitis", "hepatitis_b"], ages=(30, 75)),
    _fact("pancreatitis", ["digestive"],
          ("acute pancreatitis", None, "severe upper abdominal pain spreading to the back",
           "serum amylase and lipase", ()),
          ("急性胰腺炎", None, "上腹剧痛并向腰背部放射", "血淀粉酶和脂肪酶", ()),
          near=["peptic_ulcer", "gallstones", "myocardial_infarction"]),
    _fact("kidney_stones", ["urinary"],
          ("kidney stones", None, "colicky flank pain with blood in the urine", "urinary tract ultrasound",
           ("nephrolithiasis", "renal calculi")),
          ("肾结石", None, "阵发性腰部绞痛伴血尿", "泌尿系超声", ("肾石症",)),
          near=["uti", "bph"]),
    _fact("conjunctivitis", ["eye"],
          ("bacterial conjunctivitis", "levofloxacin eye drops", "a red eye with sticky discharge", None, ()),
          ("细菌性结膜炎", "左氧氟沙星滴眼液", "眼红伴脓性分泌物", None, ()),
          ages=(5, 70)),
    _fact("cataract", ["eye"],
          ("cataract", None, "gradual painless blurring of vision", "slit-lamp examination", ()),
          ("白内障", None, "无痛性渐进性视物模糊", "裂隙灯检查", ()),
          near=["glaucoma"], ages=(60, 90)),
    _fact("scabies", ["skin"],
          ("scabies", "permethrin cream", "intense itching that is worse at night", "skin scraping for mites",
           ()),
          ("疥疮", "扑灭司林乳膏", "夜间加重的剧烈瘙痒", "皮损刮片查疥螨", ()),
          near=["psoriasis", "allergic_rhinitis", "anaphylaxis"]),
    _fact("gastroenteritis", ["digestive"],
          ("acute gastroenteritis", "oral rehydration salts", "diarrhoea and vomiting", "stool examination",
           ("stomach flu",)),
          ("急性胃肠炎", "口服补液盐", "腹泻伴呕吐", "粪便常规", ("胃肠炎",)),
          near=["peptic_ulcer"]),
    _fact("alzheimers", ["nervous", "mental"],
          ("Alzheimer's disease", "donepezil", "progressive memory loss", "cognitive assessment (MMSE)", ()),
          ("阿尔茨海默病", "多奈哌齐", "进行性记忆力减退", "认知功能评估（MMSE）", ("老年痴呆",)),
          near=["parkinsons", "depression", "hypothyroidism", "b12_deficiency", "schizophrenia", "stroke"],
          ages=(65, 90)),
    _fact("lupus", ["immune", "skin", "musculoskeletal", "urinary", "blood", "nervous", "cardiovascular",
                    "respiratory"],
          ("systemic lupus erythematosus", "hydroxychloroquine", "a butterfly-shaped rash across the face",
           "antinuclear antibodies (ANA)", ("SLE", "lupus")),
          ("系统性红斑狼疮", "羟氯喹", "面部蝶形红斑", "抗核抗体", ("SLE",)),
          near=["rheumatoid_arthritis", "malaria", *_ANTITHROMBOTIC], ages=(18, 50), sex="f"),
)
BY_KEY = {f.key: f for f in FACTS}


def _near_table() -> dict[str, frozenset[str]]:
    near: dict[str, set[str]] = {f.key: {f.key} for f in FACTS}
    for f in FACTS:
        for other in f.near:
            near[f.key].add(other)
            near[other].add(f.key)  # KeyError on a typo: the table is checked when the module loads
    return {k: frozenset(v) for k, v in near.items()}


NEAR = _near_table()
# Conditions treated long term with their table drug: the comorbidities ("a history of X, taking Y") of notes.
CHRONIC = ("hypertension", "t2dm", "asthma", "hypothyroidism", "hyperthyroidism", "atrial_fibrillation", "epilepsy",
           "heart_failure", "parkinsons", "rheumatoid_arthritis", "depression", "osteoporosis", "bph", "hepatitis_b",
           "glaucoma", "schizophrenia", "alzheimers", "lupus", "peptic_ulcer")


# ---------------------------------------------------------------------------------------------- text


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text[:1].islower() else text


def _join(items: Sequence[str], lang: str) -> str:
    return ("，" if lang == "zh" else ", ").join(items) or ("无" if lang == "zh" else "none")


def answer_sentence(letters: str, lang: str) -> str:
    """The sentence every multiple-choice reply ends with: "The answer is AC." / "答案为AC。"."""
    return f"答案为{letters}。" if lang == "zh" else f"The answer is {letters}."


MAX_WORDS = 120  # per conversation: English words + Chinese characters / 1.5


def _words(*texts: str) -> float:
    """English words plus Chinese characters / 1.5 (a Chinese word is about 1.5 characters)."""
    text = " ".join(texts)
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return len("".join(" " if "\u4e00" <= ch <= "\u9fff" else ch for ch in text).split()) + cjk / 1.5


def is_chinese(text: str) -> bool:
    """Whether ``text`` has CJK characters (the language of a question, for its answer-format line)."""
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def format_mcq(question: str, options: Sequence[str] | dict[str, str], lang: str | None = None) -> str:
    """The user turn of a multiple-choice question: the question, its lettered options, one line asking for the
    answer sentence. ``options`` as in the eval file (a dict letter -> text, or a list lettered A, B, ...);
    ``lang`` "en" / "zh", detected from the question when None."""
    if not isinstance(options, dict):
        options = dict(zip(LETTERS, options, strict=False))
    lang = lang or ("zh" if is_chinese(question) else "en")
    lines = [question, *(f"{letter}. {text}" for letter, text in options.items())]
    # "{answer}" stays a placeholder: a concrete letter in every prompt would bias a small model towards it.
    lines.append("请在回答的最后用以下格式回答：答案为{answer}。" if lang == "zh" else
                 "Please format the final answer at the end of the response as: The answer is {answer}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class MCQ:
    """A multiple-choice question; ``key`` = (kind, condition or system, language) names what it asks."""

    key: tuple[str, str, str]
    question: str
    options: tuple[str, ...]
    answer: str  # letters, sorted: "B", "AC"
    explanation: str
    sources: tuple[str, ...] = ()  # the conditions its distractors come from (single-answer questions)

    @property
    def kind(self) -> str:
        return self.key[0]

    @property
    def lang(self) -> str:
        return self.key[2]

    def reply(self) -> str:
        return f"{self.explanation}{'' if self.lang == 'zh' else ' '}{answer_sentence(self.answer, self.lang)}"


# kind -> language -> templates. Fields: c d s t (condition, drug, symptom, test), y (body system); capitals are
# the English sentence-initial forms; x / X / xc: the first distractor's value and its condition.
QUESTIONS = {
    "drug": {"en": ["Which of the following drugs is commonly used to treat {c}?",
                    "A patient is diagnosed with {c}. Which medication is most appropriate?",
                    "Which drug is a standard treatment for {c}?"],
             "zh": ["下列哪种药物常用于治疗{c}？", "患者确诊为{c}，下列哪种药物最合适？", "治疗{c}的常用药物是？"]},
    "symptom": {"en": ["Which symptom is most typical of {c}?",
                       "Which of the following is a characteristic symptom of {c}?",
                       "A patient with {c} is most likely to report which symptom?"],
                "zh": ["{c}最典型的症状是？", "下列哪项是{c}的典型表现？", "{c}患者最可能出现下列哪种症状？"]},
    "test": {"en": ["Which test is most useful for diagnosing {c}?",
                    "Which investigation is key in the work-up of {c}?",
                    "To confirm suspected {c}, which test should be ordered?"],
             "zh": ["诊断{c}最有价值的检查是？", "疑似{c}时应首先完善下列哪项检查？",
                    "下列哪项检查对{c}的诊断最关键？"]},
    "drug_reverse": {"en": ["Which condition is commonly treated with {d}?",
                            "A doctor prescribes {d}. Which condition is the patient most likely being treated for?",
                            "{D} is a standard treatment for which of the following conditions?"],
                     "zh": ["{d}主要用于治疗下列哪种疾病？", "下列哪种疾病常使用{d}治疗？",
                            "医生开具{d}，患者最可能患有哪种疾病？"]},
    "symptom_reverse": {"en": ["A patient presents with {s}. Which condition is most likely?",
                               "Which condition typically causes {s}?",
                               "{S} is a typical sign of which of the following conditions?"],
                        "zh": ["患者出现{s}，最可能的诊断是？", "下列哪种疾病的典型表现为{s}？",
                               "{s}最常见于下列哪种疾病？"]},
    "system": {"en": ["Which body system is mainly affected by {c}?", "{C} is mainly a disorder of which body system?"],
               "zh": ["{c}主要累及哪个系统或器官？", "{c}主要是哪个系统或器官的疾病？"]},
    "system_multi": {"en": ["Which of the following conditions mainly affect the {y}? "
                            "(There may be more than one correct answer.)"],
                     "zh": ["下列哪些疾病主要累及{y}？（本题可能有多个正确答案）"]},
    "statements_multi": {"en": ["Which of the following statements about {c} are correct? "
                                "(There may be more than one correct answer.)"],
                         "zh": ["关于{c}，下列说法正确的是？（本题可能有多个正确答案）"]},
}
# The held-out phrasings: only the evaluation file asks in these words (training asks the same facts in QUESTIONS').
EVAL_QUESTIONS = {
    "drug": {"en": ["What is the usual first-choice medicine for a patient with {c}?",
                    "Someone has just been told they have {c}. Which medicine will they most likely be given?"],
             "zh": ["{c}患者通常首选哪种药物？", "某人刚被诊断为{c}，医生最可能给他开哪种药？"]},
    "symptom": {"en": ["Which complaint would you expect from someone who has {c}?",
                       "People with {c} most often notice which problem?"],
                "zh": ["{c}患者通常会有哪种主诉？", "得了{c}的人最常注意到哪种不适？"]},
    "test": {"en": ["Which examination best confirms a diagnosis of {c}?",
                    "A clinician suspects {c}. Which investigation settles it?"],
             "zh": ["确诊{c}最有帮助的检查是哪一项？", "医生怀疑{c}，做哪项检查最能明确诊断？"]},
    "drug_reverse": {"en": ["A patient's medication list includes {d}. Which condition is it most likely for?"],
                     "zh": ["患者正在服用{d}，最可能患有下列哪种疾病？"]},
    "symptom_reverse": {"en": ["Someone comes to the clinic with {s}. What is the most likely diagnosis?"],
                        "zh": ["某人因{s}就诊，最可能是哪种疾病？"]},
}
EVAL_KINDS = tuple(EVAL_QUESTIONS)
TAUGHT = 3  # stage-1 questions per held-out question: the same fact, each in another training phrasing

EXPLANATIONS = {  # English ones start with the condition: no verb agreement with "eye drops", "TSH and T4"
    "drug": {"en": "{C} is commonly treated with {d}, whereas {x} would be used for {xc}.",
             "zh": "{d}是治疗{c}的常用药物，{x}则主要用于{xc}。"},
    "symptom": {"en": "{C} typically presents with {s}, while {x} would suggest {xc}.",
                "zh": "{s}是{c}的典型表现，而{x}更提示{xc}。"},
    "test": {"en": "The key test for {c} is {t}, while {x} would be used to diagnose {xc}.",
             "zh": "{t}是诊断{c}的关键检查，{x}则用于诊断{xc}。"},
    "drug_reverse": {"en": "{C} is commonly treated with {d} and typically presents with {s}.",
                     "zh": "{d}常用于治疗{c}，{c}的典型表现为{s}。"},
    "symptom_reverse": {"en": "{C} typically presents with {s}.", "zh": "{s}是{c}的典型表现。"},
    "symptom_reverse_drug": {"en": "{C} typically presents with {s} and is commonly treated with {d}.",
                             "zh": "{s}是{c}的典型表现，常用{d}治疗。"},
    "system": {"en": "{C} mainly affects the {y} and typically presents with {s}.",
               "zh": "{c}主要累及{y}，典型表现为{s}。"},
    "system_multi": {"en": "{C} and {c2} mainly affect the {y}; the other conditions affect other systems.",
                     "zh": "{c}和{c2}主要累及{y}，其余疾病主要累及其他系统。"},
    "statements_multi": {"en": "{C} {first} and {second}; the other statements describe other conditions.",
                         "zh": "{c}{first}，{second}，其余说法描述的是其他疾病。"},
}
STATEMENTS = {  # attribute -> language -> (the statement as an option, the same fact inside an explanation)
    "drug": {"en": ("It is commonly treated with {d}.", "is commonly treated with {d}"), "zh": ("常用{d}治疗",) * 2},
    "symptom": {"en": ("It typically presents with {s}.", "typically presents with {s}"),
                "zh": ("典型表现为{s}",) * 2},
    "test": {"en": ("A key test for it is {t}.", "is diagnosed with the help of {t}"), "zh": ("关键检查为{t}",) * 2},
}
ATTRIBUTES = ("drug", "symptom", "test")
SINGLE_KINDS = ("drug", "symptom", "test", "drug_reverse", "symptom_reverse", "system")


def _fields(fact: Fact, lang: str) -> dict[str, str]:
    t = fact.terms(lang)
    system = SYSTEMS[fact.systems[0]][lang == "zh"] if fact.systems else ""
    out = {"c": t.condition, "d": t.drug or "", "s": t.symptom, "t": t.test or "", "y": system}
    out.update({k.upper(): _cap(v) if lang == "en" else v for k, v in list(out.items())})
    return out


def _value(fact: Fact, lang: str, attr: str) -> str | None:
    return getattr(fact.terms(lang), attr)


def _unrelated(fact: Fact, attr: str | None, rng: random.Random, n: int, exclude: frozenset[str] = frozenset()
               ) -> list[Fact]:
    """``n`` facts not near ``fact`` that know ``attr`` (any when None), with distinct values of it; none whose
    condition is in ``exclude`` (the distractors a question must not reuse)."""
    pool, seen = [], set()
    for other in FACTS:
        value = _value(other, "en", attr) if attr else other.key
        if (other.key not in NEAR[fact.key] and value is not None and value not in seen
                and other.key not in exclude):
            seen.add(value)
            pool.append(other)
    return rng.sample(pool, n)


def _shuffled(correct: list[str], wrong: list[str], rng: random.Random, avoid: str = ""
              ) -> tuple[tuple[str, ...], str]:
    """The options in a random order and the correct letters; a single correct answer never lands on a letter in
    ``avoid`` (the letters a held-out question's answer had in training)."""
    options = correct + wrong
    rng.shuffle(options)
    while len(correct) == 1 and LETTERS[options.index(correct[0])] in avoid:
        rng.shuffle(options)
    return tuple(options), "".join(sorted(LETTERS[options.index(c)] for c in correct))


def _single(fact: Fact, kind: str, lang: str, rng: random.Random, phrasings: Sequence[str] | None = None,
            exclude: frozenset[str] = frozenset(), avoid: str = "") -> MCQ | None:
    """One single-answer question of ``kind`` about ``fact``, or None when the fact lacks what it asks. Its
    phrasing is one of ``phrasings`` (default: the training ones, QUESTIONS); no distractor comes from a
    condition in ``exclude`` and the answer's letter is not in ``avoid``."""
    attr = kind.removesuffix("_reverse")
    if (kind == "system" and not fact.systems) or (attr in ATTRIBUTES and _value(fact, "en", attr) is None):
        return None
    fields, n_wrong = _fields(fact, lang), rng.choice((3, 3, 4))
    if kind == "system":
        wrong = [SYSTEMS[k][lang == "zh"] for k in rng.sample([k for k in SYSTEMS if k not in fact.systems], n_wrong)]
        correct, sources = fields["y"], ()
    else:
        forward = kind in ATTRIBUTES
        others = _unrelated(fact, attr if forward else None, rng, n_wrong, exclude)
        wrong = [_value(f, lang, attr if forward else "condition") for f in others]
        correct, sources = _value(fact, lang, attr if forward else "condition"), tuple(f.key for f in others)
        fields.update(x=wrong[0], X=_cap(wrong[0]) if lang == "en" else wrong[0], xc=others[0].terms(lang).condition)
    if kind == "symptom_reverse" and fact.en.drug:
        kind = "symptom_reverse_drug"
    question = rng.choice(phrasings or QUESTIONS[kind.removesuffix("_drug")][lang]).format(**fields)
    options, letters = _shuffled([correct], wrong, rng, avoid)
    return MCQ((kind.removesuffix("_drug"), fact.key, lang), question, options, letters,
               EXPLANATIONS[kind][lang].format(**fields), sources)


def _statements(fact: Fact, lang: str, rng: random.Random) -> MCQ | None:
    """Two true statements about ``fact`` among 4, the false ones borrowed from unrelated facts."""
    known = [a for a in ATTRIBUTES if _value(fact, "en", a) is not None]
    if len(known) < 2:
        return None
    true_attrs = rng.sample(known, 2)
    wrong = []
    for other in _unrelated(fact, None, rng, 2):  # 4 options: 5 long statements make a long prompt
        attr = rng.choice([a for a in ATTRIBUTES if _value(other, "en", a) is not None])
        wrong.append(STATEMENTS[attr][lang][0].format(**_fields(other, lang)))
    fields = _fields(fact, lang)
    correct = [STATEMENTS[a][lang][0].format(**fields) for a in true_attrs]
    first, second = (STATEMENTS[a][lang][1].format(**fields) for a in true_attrs)
    options, letters = _shuffled(correct, wrong, rng)
    return MCQ(("statements_multi", fact.key, lang), QUESTIONS["statements_multi"][lang][0].format(**fields),
               options, letters, EXPLANATIONS["statements_multi"][lang].format(**fields, first=first, second=second))


def _system_multi(system: str, lang: str, rng: random.Random) -> MCQ | None:
    """Two conditions whose primary system is ``system`` among 4-5; the others never affect it."""
    members = [f for f in FACTS if f.systems and f.systems[0] == system]
    outsiders = [f for f in FACTS if f.systems and system not in f.systems]  # no system: can't say "not this one"
    if len(members) < 2:
        return None
    right, wrong = rng.sample(members, 2), rng.sample(outsiders, rng.choice((2, 3)))
    fields = {**_fields(right[0], lang), "c2": right[1].terms(lang).condition}
    names = [[f.terms(lang).condition for f in group] for group in (right, wrong)]
    options, letters = _shuffled(*names, rng)
    return MCQ(("system_multi", system, lang), QUESTIONS["system_multi"][lang][0].format(**fields), options, letters,
               EXPLANATIONS["system_multi"][lang].format(**fields))


def question_pool(rng: random.Random) -> list[MCQ]:
    """Every question the table allows, one per (kind, condition or system, language), in a fixed order; those
    longer than MAX_WORDS are left out."""
    pool = []
    for lang in LANGS:
        for fact in FACTS:
            pool += [_single(fact, kind, lang, rng) for kind in SINGLE_KINDS]
            pool.append(_statements(fact, lang, rng))
        pool += [_system_multi(system, lang, rng) for system in SYSTEMS]
    return [q for q in pool
            if q is not None and _words(format_mcq(q.question, q.options, q.lang), q.reply()) <= MAX_WORDS]


# ---------------------------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class Task:
    """One alignment example: extraction, normalisation or intent classification."""

    task: str
    lang: str
    prompt: str
    reply: str


EXTRACT_FIELDS = {"en": ("diseases", "drugs", "symptoms", "tests"), "zh": ("疾病", "药物", "症状", "检查")}
EXTRACT_ALL = {
    "en": "Extract the diseases, drugs, symptoms and tests from the clinical note below. Answer as \"diseases: ...; "
          "drugs: ...; symptoms: ...; tests: ...\", separating items with commas and writing none for an empty "
          "field.\nNote: {note}",
    "zh": "抽取下面病历中的疾病、药物、症状和检查，格式为“疾病：...；药物：...；症状：...；检查：...”，"
          "多项用逗号分隔，无则填“无”。\n病历：{note}",
}
EXTRACT_ONE = {
    "en": "List the {field} mentioned in the clinical note below. Answer as \"{field}: ...\", writing none if there "
          "are none.\nNote: {note}",
    "zh": "请列出下面病历中提到的{field}，按“{field}：...”格式输出，没有则填“无”。\n病历：{note}",
}
NOTES = {  # style -> language -> template; fields of the main fact, c2/d2 of a comorbidity, who/age of the patient
    "visit": {"en": "{A} {age}-year-old {who} with {c} presents with {s}. The doctor ordered {t} and started {d}.",
              "zh": "患者{who}，{age}岁，因{s}就诊，完善{t}，诊断为{c}，予{d}治疗。"},
    "history": {"en": "{A} {age}-year-old {who} with a history of {c2}, taking {d2}, presents with {s}. {rest}",
                "zh": "患者{who}，{age}岁，既往{c2}，长期服用{d2}，此次因{s}就诊，{rest}"},
    "history_test": {"en": "The diagnosis of {c} was confirmed by {t}, and {d} was prescribed.",
                     "zh": "完善{t}后确诊为{c}，加用{d}。"},
    "history_plain": {"en": "The doctor diagnosed {c} and prescribed {d}.", "zh": "诊断为{c}，加用{d}。"},
    "workup": {"en": "{A} {age}-year-old {who} presents with {s}. The doctor ordered {t}, which confirmed {c}.",
               "zh": "患者{who}，{age}岁，因{s}就诊，完善{t}后诊断为{c}。"},
}
NORMALISE = {
    "en": ["Normalise this term to its standard disease name: {alias}. Answer as \"standard term: ...\".",
           "A patient's record says \"{alias}\". What is the standard medical term? Answer as \"standard term: ...\"."],
    "zh": ["请将下列疾病名称规范化为标准术语，按“标准术语：...”格式回答：{alias}",
           "病历中写有“{alias}”，其规范的疾病名称是什么？请按“标准术语：...”格式回答。"],
}
NORMALISE_REPLY = {"en": "standard term: {c}", "zh": "标准术语：{c}"}
INTENT_LABELS = {"diagnosis": {"en": "diagnosis", "zh": "疾病诊断"},
                 "medication": {"en": "medication", "zh": "用药咨询"},
                 "examination": {"en": "examination", "zh": "检查咨询"},
                 "department": {"en": "department", "zh": "就诊科室"}}
INTENT_PROMPT = {
    "en": "Classify the intent of the patient query below as one of: diagnosis, medication, examination, department. "
          "Answer as \"intent: <label>\".\nQuery: {query}",
    "zh": "请判断下面患者提问的意图，从“疾病诊断、用药咨询、检查咨询、就诊科室”中选择一个，按“意图：<标签>”格式回答。"
          "\n提问：{query}",
}
INTENT_REPLY = {"en": "intent: {label}", "zh": "意图：{label}"}
INTENT_QUERIES = {  # intent -> language -> templates (one that names {d} or {t} needs the fact to have it)
    "diagnosis": {"en": ["I've had {s} for a few days. What could be causing it?",
                         "My father has {s}. What illness might this be?"],
                  "zh": ["我最近出现{s}，这是什么病？", "家里老人出现{s}，可能是什么问题？"]},
    "medication": {"en": ["What medicine is usually prescribed for {c}?", "Is {d} the right drug for my {c}?"],
                   "zh": ["{c}一般吃什么药？", "得了{c}可以用{d}吗？"]},
    "examination": {"en": ["Which test should I get to check for {c}?", "What can {t} tell my doctor?"],
                    "zh": ["怀疑{c}需要做什么检查？", "{t}能查出什么问题？"]},
    "department": {"en": ["Which department should I visit for {c}?",
                          "My doctor thinks I have {c}. Which specialist should I see?"],
                   "zh": ["{c}应该挂哪个科？", "医生说我可能是{c}，我该去哪个科室看？"]},
}


def _comorbidity(fact: Fact, rng: random.Random) -> tuple[Fact, tuple[int, int], str | None] | None:
    """An unrelated chronic condition on a long-term drug that the same patient could have: (fact, ages, sex)."""
    choices = []
    for key in CHRONIC:
        other = BY_KEY[key]
        lo, hi = max(fact.ages[0], other.ages[0]), min(fact.ages[1], other.ages[1])
        if (other.key not in NEAR[fact.key] and lo <= hi
                and (fact.sex is None or other.sex is None or fact.sex == other.sex)):
            choices.append((other, (lo, hi), fact.sex or other.sex))
    return rng.choice(choices) if choices else None


def _patient(ages: tuple[int, int], sex: str | None, lang: str, rng: random.Random) -> dict[str, str]:
    age, sex = rng.randint(*ages), sex or rng.choice("mf")
    if lang == "zh":
        return {"age": str(age), "who": "男" if sex == "m" else "女", "A": ""}
    who = ("boy" if sex == "m" else "girl") if age < 18 else ("man" if sex == "m" else "woman")
    return {"age": str(age), "who": who, "A": "An" if str(age).startswith("8") or age in (11, 18) else "A"}


def _note(fact: Fact, style: str, lang: str, rng: random.Random) -> tuple[str, list[list[str]]] | None:
    """A short clinical note about ``fact`` and the entities it mentions (diseases, drugs, symptoms, tests)."""
    t, f = fact.terms(lang), _fields(fact, lang)
    if style == "summary":
        parts = ([f"主诉：{t.symptom}。诊断：{t.condition}。"] if lang == "zh" else
                 [f"Complaint: {t.symptom}. Diagnosis: {t.condition}."])
        parts += [(f"检查：{t.test}。" if lang == "zh" else f" Test: {t.test}.")] if t.test else []
        parts += [(f"处理：{t.drug}。" if lang == "zh" else f" Plan: {t.drug}.")] if t.drug else []
        return "".join(parts), [[t.condition], [t.drug] if t.drug else [], [t.symptom], [t.test] if t.test else []]
    if style in ("visit", "workup") and (t.test is None or style == "visit" and t.drug is None):
        return None
    if style != "history":
        note = NOTES[style][lang].format(**f, **_patient(fact.ages, fact.sex, lang, rng))
        return note, [[t.condition], [t.drug] if style == "visit" else [], [t.symptom], [t.test]]
    found = _comorbidity(fact, rng) if t.drug else None
    if found is None:
        return None
    other, ages, sex = found
    o = other.terms(lang)
    rest = NOTES["history_test" if t.test else "history_plain"][lang].format(**f)
    note = NOTES["history"][lang].format(**f, **_patient(ages, sex, lang, rng), c2=o.condition, d2=o.drug, rest=rest)
    return note, [[o.condition, t.condition], [o.drug, t.drug], [t.symptom], [t.test] if t.test else []]


def _extraction(fact: Fact, lang: str, rng: random.Random) -> list[Task]:
    """Two extraction tasks on notes of different styles: all four fields (mostly) or one of them."""
    notes = [n for n in (_note(fact, s, lang, rng) for s in ("visit", "history", "summary", "workup")) if n]
    tasks = []
    for note, entities in rng.sample(notes, min(2, len(notes))):
        names = EXTRACT_FIELDS[lang]
        sep, colon = ("；", "：") if lang == "zh" else ("; ", ": ")
        if rng.random() < 0.7:
            prompt = EXTRACT_ALL[lang].format(note=note)
            reply = sep.join(f"{name}{colon}{_join(items, lang)}" for name, items in zip(names, entities, strict=True))
        else:
            k = rng.randrange(4)
            prompt = EXTRACT_ONE[lang].format(field=names[k], note=note)
            reply = f"{names[k]}{colon}{_join(entities[k], lang)}"
        tasks.append(Task("extract", lang, prompt, reply))
    return tasks


def _normalisation(fact: Fact, lang: str) -> list[Task]:
    t = fact.terms(lang)
    return [Task("normalise", lang, template.format(alias=alias), NORMALISE_REPLY[lang].format(c=t.condition))
            for alias in t.aliases for template in NORMALISE[lang]]


def _intents(fact: Fact, lang: str) -> list[Task]:
    f, tasks = _fields(fact, lang), []
    for intent, templates in INTENT_QUERIES.items():
        for template in templates[lang]:
            if ("{d}" in template and not f["d"]) or ("{t}" in template and not f["t"]):
                continue
            query = template.format(**f)
            reply = INTENT_REPLY[lang].format(label=INTENT_LABELS[intent][lang])
            tasks.append(Task("intent", lang, INTENT_PROMPT[lang].format(query=query), reply))
    return tasks


def alignment_pool(rng: random.Random) -> dict[tuple[str, str], list[Task]]:
    """Alignment tasks by (task, language), each prompt once, in a fixed order, none longer than MAX_WORDS."""
    pool: dict[tuple[str, str], list[Task]] = {(task, lang): [] for task, _ in ALIGN_SHARES for lang in LANGS}
    seen: set[str] = set()
    for lang in LANGS:
        for fact in FACTS:
            for task in (*_extraction(fact, lang, rng), *_normalisation(fact, lang), *_intents(fact, lang)):
                if task.prompt not in seen and _words(task.prompt, task.reply) <= MAX_WORDS:
                    seen.add(task.prompt)
                    pool[task.task, lang].append(task)
    return pool


# ---------------------------------------------------------------------------------------------- files

SYSTEM_PROMPTS = {  # task family -> language -> system turns (a quarter of the training records have one)
    "mcq": {"en": ["You are a knowledgeable medical assistant.", "You are a doctor answering exam questions."],
            "zh": ["你是一名专业的医学助手。", "你是一名正在解答医学考试题的医生。"]},
    "align": {"en": ["You are a clinical text-processing assistant. Follow the requested output format exactly.",
                     "You are a helpful medical assistant."],
              "zh": ["你是一名临床文本处理助手，请严格按要求的格式输出。", "你是一名专业的医学助手。"]},
}
SYSTEM_TURN_RATE = 0.25
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def _record(task: str, lang: str, prompt: str, reply: str, rng: random.Random, **meta: str) -> dict:
    """A training record in either format, sometimes with a system turn; ``task``/``lang``/meta ride along."""
    turns = [("user", prompt), ("assistant", reply)]
    if rng.random() < SYSTEM_TURN_RATE:
        system = rng.choice(SYSTEM_PROMPTS["mcq" if task.startswith("mcq") else "align"][lang])
        if _words(system, prompt, reply) <= MAX_WORDS:  # the pools hold only conversations that fit without one
            turns.insert(0, ("system", system))
    record = {"task": task, "lang": lang, **meta}
    if rng.random() < 0.5:
        record["conversations"] = [{"from": SHAREGPT[role], "value": text} for role, text in turns]
    else:
        record["messages"] = [{"role": role, "content": text} for role, text in turns]
    return record


def _mcq_record(q: MCQ, rng: random.Random) -> dict:
    return _record(f"mcq_{q.kind}", q.lang, format_mcq(q.question, q.options, q.lang), q.reply(), rng,
                   answer=q.answer, fact=q.key[1])


def _eval_record(q: MCQ, rng: random.Random) -> dict:
    """The plain evaluation format, plus the same question as a conversation (the user turn an evaluation should
    send, the reference reply) so that the file is also a valid data file for ``medcare.data check``."""
    # Both option layouts the evaluation format allows: mostly a letter -> text dict, sometimes a plain list.
    options = list(q.options) if rng.random() < 0.25 else dict(zip(LETTERS, q.options, strict=False))
    return {"question": q.question, "options": options, "answer": q.answer, "task": f"{q.kind}_{q.lang}",
            "type": "knowledge", "fact": q.key[1],
            "messages": [{"role": "user", "content": format_mcq(q.question, options, q.lang)},
                                              {"role": "assistant", "content": q.reply()}]}


def _pick(items: list, n: int, rng: random.Random) -> list:
    if n > len(items):
        raise ValueError(f"the fact table yields {len(items)} items, {n} are needed")
    return rng.sample(items, n)


def _held_out(fact: Fact, kind: str, lang: str, rng: random.Random) -> tuple[MCQ, list[MCQ]] | None:
    """A held-out question and the TAUGHT stage-1 questions that teach its fact: the same (kind, condition,
    language), in other phrasings (training ones; the held-out one is an EVAL_QUESTIONS phrasing), the
    held-out question with distractors from none of their conditions and its answer on none of their
    letters. None when the fact lacks what ``kind`` asks or a question would be too long."""
    phrasings = QUESTIONS[kind][lang]
    taught = [_single(fact, kind, lang, rng, [p]) for p in rng.sample(phrasings, TAUGHT)]
    if taught[0] is None:
        return None
    used = frozenset(k for q in taught for k in q.sources)
    try:
        held = _single(fact, kind, lang, rng, EVAL_QUESTIONS[kind][lang], used, "".join(q.answer for q in taught))
    except ValueError:  # too few conditions left for fresh distractors
        return None
    if any(_words(format_mcq(q.question, q.options, q.lang), q.reply()) > MAX_WORDS for q in [held, *taught]):
        return None
    return held, taught


def _split_questions(pool: list[MCQ], rng: random.Random) -> tuple[list[MCQ], list[MCQ]]:
    """Held-out questions, then stage-1 ones: per language, EVAL_MCQ / 2 held-out facts (kind, condition) each
    taught by TAUGHT stage-1 questions (see _held_out), and the rest of STAGE1_MCQ / 2 from the pool on other
    keys, a MULTI_FRACTION of them with two correct letters."""
    held, train = [], []
    for lang in LANGS:
        keys = [(fact, kind) for fact in FACTS for kind in EVAL_KINDS]
        rng.shuffle(keys)
        chosen: list[tuple[MCQ, list[MCQ]]] = []
        for fact, kind in keys:
            if len(chosen) == EVAL_MCQ // 2:
                break
            found = _held_out(fact, kind, lang, rng)
            if found is not None:
                chosen.append(found)
        if len(chosen) < EVAL_MCQ // 2:
            raise ValueError(f"the fact table yields {len(chosen)} held-out questions, {EVAL_MCQ // 2} are needed")
        held += [h for h, _ in chosen]
        train += [q for _, taught in chosen for q in taught]
        taken = {h.key for h, _ in chosen}
        rest = STAGE1_MCQ // 2 - TAUGHT * len(chosen)
        n_multi = round(rest * MULTI_FRACTION)
        single = [q for q in pool if q.lang == lang and len(q.answer) == 1 and q.key not in taken]
        multi = [q for q in pool if q.lang == lang and len(q.answer) > 1]
        train += _pick(multi, n_multi, rng) + _pick(single, rest - n_multi, rng)
    return held, train


def _quotas(total: int) -> dict[str, int]:
    """Per-language count of each alignment task: its share of total / 2, the last task taking the rounding."""
    per_lang = total // len(LANGS)
    counts = {task: round(per_lang * share) for task, share in ALIGN_SHARES[:-1]}
    counts[ALIGN_SHARES[-1][0]] = per_lang - sum(counts.values())
    return counts


def _split_alignment(pool: dict[tuple[str, str], list[Task]], rng: random.Random
                     ) -> tuple[list[Task], list[Task], list[Task]]:
    """Disjoint stage-1, stage-2 and held-out alignment tasks, split by task and language as ALIGN_SHARES says."""
    stage1, stage2, held = [], [], []
    q1, q2, q3 = _quotas(STAGE1_ALIGN), _quotas(STAGE2_ALIGN), _quotas(EVAL_ALIGN)
    for lang in LANGS:
        for task, _ in ALIGN_SHARES:
            chosen = _pick(pool[task, lang], q1[task] + q2[task] + q3[task], rng)
            stage1 += chosen[:q1[task]]
            stage2 += chosen[q1[task]:q1[task] + q2[task]]
            held += chosen[q1[task] + q2[task]:]
    return stage1, stage2, held


ALIGN_TYPES = {"extract": "extraction", "normalise": "normalisation", "intent": "classification"}
REPLY_PREFIX = {"normalise": {"en": "standard term: ", "zh": "标准术语："},
                "intent": {"en": "intent: ", "zh": "意图："}}


def _align_eval_record(t: Task) -> dict:
    """A held-out alignment task in medcare.eval's record format (medcare.alignment): the prompt, the gold
    answer (an extraction's whole reply; a normalisation's term; an intent's label), the allowed labels and the
    reply prefix, plus the conversation, so that the file also passes ``python -m medcare.data check``."""
    record = {"type": ALIGN_TYPES[t.task], "task": f"{t.task}_{t.lang}", "prompt": t.prompt}
    prefix = REPLY_PREFIX.get(t.task, {}).get(t.lang, "")
    assert t.reply.startswith(prefix), t.reply
    record["answer"] = t.reply[len(prefix):]
    if t.task == "intent":
        record["labels"] = [labels[t.lang] for labels in INTENT_LABELS.values()]
    if prefix:
        record["reply_prefix"] = prefix
    record["messages"] = [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.reply}]
    return record


def _with_ids(records: list[dict], prefix: str, rng: random.Random) -> list[dict]:
    rng.shuffle(records)
    return [{"id": f"{prefix}-{i:04d}", **r} for i, r in enumerate(records, 1)]


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    """The files' records: ``{"stage1.jsonl": [...], "stage2.jsonl": [...], "eval.jsonl": [...],
    "eval_align.jsonl": [...]}``."""
    rng = random.Random(seed)
    held, train = _split_questions(question_pool(rng), rng)
    align1, align2, align_held = _split_alignment(alignment_pool(rng), rng)
    stage1 = [_mcq_record(q, rng) for q in train] + [_record(t.task, t.lang, t.prompt, t.reply, rng) for t in align1]
    stage2 = [_record(t.task, t.lang, t.prompt, t.reply, rng) for t in align2]
    held = [_eval_record(q, rng) for q in held]
    rng.shuffle(held)
    return {"stage1.jsonl": _with_ids(stage1, "stage1", rng), "stage2.jsonl": _with_ids(stage2, "stage2", rng),
            "eval.jsonl": held,
            "eval_align.jsonl": _with_ids([_align_eval_record(t) for t in align_held], "align", rng)}


def render(files: dict[str, list[dict]]) -> dict[str, str]:
    """Each file's exact text: JSON Lines, UTF-8 characters unescaped, "\\n" line ends."""
    return {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) for name, records in files.items()}


def write(out_dir: str | Path = DEMO_DIR, seed: int = SEED) -> list[Path]:
    """Writes the three files into ``out_dir`` (default: beside this module, where the package ships them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render(generate(seed)).items():
        (out / name).write_bytes(text.encode("utf-8"))
        paths.append(out / name)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medcare.demo.make_data", description=__doc__.split("\n")[0])
    ap.add_argument("--output", default=str(DEMO_DIR), help="directory to write (default: the medcare.demo package)")
    ap.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED}; the bundled files use it)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when the files differ from the output")
    args = ap.parse_args(argv)
    if args.check:
        stale = [name for name, text in render(generate(args.seed)).items()
                 if not (Path(args.output) / name).is_file()
                 or (Path(args.output) / name).read_bytes() != text.encode("utf-8")]
        print(f"medcare.demo.make_data: {'out of date: ' + ', '.join(stale) if stale else 'up to date'}")
        return 1 if stale else 0
    for path in write(args.output, args.seed):
        print(f"medcare.demo.make_data: wrote {path} ({sum(1 for _ in path.open(encoding='utf-8'))} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
