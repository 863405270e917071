"""Subject tables of CMMLU and C-Eval: Chinese subject names (used in the prompt header) and category groupings.

CMMLU (haonan-li/CMMLU, src/categories.py): each subject has one or two subcategories; a subject counts towards every
category one of its subcategories belongs to (so "China specific" overlaps the other four). C-Eval
(ceval/subject_mapping.json): each subject belongs to exactly one of STEM, Social Science, Humanities, Other.
"""
from __future__ import annotations

# subject -> (Chinese name, subcategories)
CMMLU_SUBJECTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "agronomy": ("农学", ("other",)),
    "anatomy": ("解剖学", ("biology",)),
    "ancient_chinese": ("古汉语", ("linguistics", "china specific")),
    "arts": ("艺术学", ("arts",)),
    "astronomy": ("天文学", ("physics",)),
    "business_ethics": ("商业伦理", ("business",)),
    "chinese_civil_service_exam": ("中国公务员考试", ("politics", "china specific")),
    "chinese_driving_rule": ("中国驾驶规则", ("other", "china specific")),
    "chinese_food_culture": ("中国饮食文化", ("culture", "china specific")),
    "chinese_foreign_policy": ("中国外交政策", ("politics", "china specific")),
    "chinese_history": ("中国历史", ("history", "china specific")),
    "chinese_literature": ("中国文学", ("literature", "china specific")),
    "chinese_teacher_qualification": ("中国教师资格", ("education", "china specific")),
    "clinical_knowledge": ("临床知识", ("other",)),
    "college_actuarial_science": ("大学精算学", ("math",)),
    "college_education": ("大学教育学", ("education",)),
    "college_engineering_hydrology": ("大学工程水文学", ("engineering",)),
    "college_law": ("大学法律", ("law",)),
    "college_mathematics": ("大学数学", ("math",)),
    "college_medical_statistics": ("大学医学统计", ("statistics",)),
    "college_medicine": ("大学医学", ("other",)),
    "computer_science": ("计算机科学", ("computer science",)),
    "computer_security": ("计算机安全", ("other",)),
    "conceptual_physics": ("概念物理学", ("physics",)),
    "construction_project_management": ("建设工程管理", ("other", "china specific")),
    "economics": ("经济学", ("economics",)),
    "education": ("教育学", ("education",)),
    "electrical_engineering": ("电气工程", ("engineering",)),
    "elementary_chinese": ("小学语文", ("linguistics", "china specific")),
    "elementary_commonsense": ("小学常识", ("other", "china specific")),
    "elementary_information_and_technology": ("小学信息技术", ("other",)),
    "elementary_mathematics": ("初等数学", ("math",)),
    "ethnology": ("民族学", ("culture", "china specific")),
    "food_science": ("食品科学", ("other",)),
    "genetics": ("遗传学", ("biology",)),
    "global_facts": ("全球事实", ("global",)),
    "high_school_biology": ("高中生物", ("biology",)),
    "high_school_chemistry": ("高中化学", ("chemistry",)),
    "high_school_geography": ("高中地理", ("geography",)),
    "high_school_mathematics": ("高中数学", ("math",)),
    "high_school_physics": ("高中物理学", ("physics",)),
    "high_school_politics": ("高中政治", ("politics", "china specific")),
    "human_sexuality": ("人类性行为", ("other",)),
    "international_law": ("国际法学", ("law",)),
    "journalism": ("新闻学", ("sociology",)),
    "jurisprudence": ("法理学", ("law",)),
    "legal_and_moral_basis": ("法律与道德基础", ("other",)),
    "logical": ("逻辑学", ("philosophy",)),
    "machine_learning": ("机器学习", ("computer science",)),
    "management": ("管理学", ("business",)),
    "marketing": ("市场营销", ("business",)),
    "marxist_theory": ("马克思主义理论", ("philosophy",)),
    "modern_chinese": ("现代汉语", ("linguistics", "china specific")),
    "nutrition": ("营养学", ("other",)),
    "philosophy": ("哲学", ("philosophy",)),
    "professional_accounting": ("专业会计", ("business",)),
    "professional_law": ("专业法学", ("law",)),
    "professional_medicine": ("专业医学", ("other",)),
    "professional_psychology": ("专业心理学", ("psychology",)),
    "public_relations": ("公共关系", ("politics",)),
    "security_study": ("安全研究", ("politics",)),
    "sociology": ("社会学", ("culture",)),
    "sports_science": ("体育学", ("other",)),
    "traditional_chinese_medicine": ("中医中药", ("other", "china specific")),
    "virology": ("病毒学", ("biology",)),
    "world_history": ("世界历史", ("history",)),
    "world_religions": ("世界宗教", ("global",)),
}

# category -> subcategories (CMMLU's `categories`)
CMMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"),
    "Humanities": ("history", "philosophy", "law", "arts", "literature", "global"),
    "Social Science": ("linguistics", "business", "politics", "culture", "economics", "geography", "psychology",
                       "education", "sociology"),
    "Other": ("other",),
    "China specific": ("china specific",),
}

# subject -> (Chinese name, category); C-Eval's 52 subjects in its own order
CEVAL_SUBJECTS: dict[str, tuple[str, str]] = {}
for _category, _names in (
    ("STEM", (("computer_network", "计算机网络"), ("operating_system", "操作系统"),
              ("computer_architecture", "计算机组成"), ("college_programming", "大学编程"),
              ("college_physics", "大学物理"), ("college_chemistry", "大学化学"),
              ("advanced_mathematics", "高等数学"), ("probability_and_statistics", "概率统计"),
              ("discrete_mathematics", "离散数学"), ("electrical_engineer", "注册电气工程师"),
              ("metrology_engineer", "注册计量师"), ("high_school_mathematics", "高中数学"),
              ("high_school_physics", "高中物理"), ("high_school_chemistry", "高中化学"),
              ("high_school_biology", "高中生物"), ("middle_school_mathematics", "初中数学"),
              ("middle_school_biology", "初中生物"), ("middle_school_physics", "初中物理"),
              ("middle_school_chemistry", "初中化学"), ("veterinary_medicine", "兽医学"))),
    ("Social Science", (("college_economics", "大学经济学"), ("business_administration", "工商管理"),
                        ("marxism", "马克思主义基本原理"),
                        ("mao_zedong_thought", "毛泽东思想和中国特色社会主义理论体系概论"),
                        ("education_science", "教育学"), ("teacher_qualification", "教师资格"),
                        ("high_school_politics", "高中政治"), ("high_school_geography", "高中地理"),
                        ("middle_school_politics", "初中政治"), ("middle_school_geography", "初中地理"))),
    ("Humanities", (("modern_chinese_history", "近代史纲要"),
                    ("ideological_and_moral_cultivation", "思想道德修养与法律基础"), ("logic", "逻辑学"),
                    ("law", "法学"), ("chinese_language_and_literature", "中国语言文学"), ("art_studies", "艺术学"),
                    ("professional_tour_guide", "导游资格"), ("legal_professional", "法律职业资格"),
                    ("high_school_chinese", "高中语文"), ("high_school_history", "高中历史"),
                    ("middle_school_history", "初中历史"))),
    ("Other", (("civil_servant", "公务员"), ("sports_science", "体育学"), ("plant_protection", "植物保护"),
               ("basic_medicine", "基础医学"), ("clinical_medicine", "临床医学"),
               ("urban_and_rural_planner", "注册城乡规划师"), ("accountant", "注册会计师"),
               ("fire_engineer", "注册消防工程师"), ("environmental_impact_assessment_engineer", "环境影响评价工程师"),
               ("tax_accountant", "税务师"), ("physician", "医师资格"))),
):
    for _subject, _zh in _names:
        CEVAL_SUBJECTS[_subject] = (_zh, _category)

CEVAL_CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")


def chinese_name(subject: str, benchmark: str) -> str:
    """The subject's Chinese name for the prompt header; unknown subjects keep their file name (underscores as spaces)."""
    table = CMMLU_SUBJECTS if benchmark == "cmmlu" else CEVAL_SUBJECTS
    return table[subject][0] if subject in table else subject.replace("_", " ")


def subject_categories(subject: str, benchmark: str) -> list[str]:
    """The categories a subject is averaged into (empty for a subject outside the benchmark's table)."""
    if benchmark == "cmmlu":
        if subject not in CMMLU_SUBJECTS:
            return []
        subcategories = CMMLU_SUBJECTS[subject][1]
        return [c for c, subs in CMMLU_CATEGORIES.items() if any(s in subs for s in subcategories)]
    return [CEVAL_SUBJECTS[subject][1]] if subject in CEVAL_SUBJECTS else []


def category_names(benchmark: str) -> tuple[str, ...]:
    return tuple(CMMLU_CATEGORIES) if benchmark == "cmmlu" else CEVAL_CATEGORIES
