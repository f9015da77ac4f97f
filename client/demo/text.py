"""Phrase banks for the FICTIONAL demo consortium (see :mod:`client.demo.data`).

Everything here is invented teaching material, not clinical guidance and not
taken from any record. Phrases are noun phrases (so every site style can list
them) with placeholders filled per note: ``{he} {his} {him} {He} {His}`` for
pronouns and ``{few} {many} {hours} {units} {kg} {bmi} {kcal} {money} {year}
{dur} {hobby} {trauma}`` for random details.

``CODE_VOCAB`` is code-specific and only ever reaches site notes; ``GENERIC``
and ``PUBLIC`` hold the general clinical language the public split is made of.
The ``render_*`` functions lay one note's content (a dict of chosen phrases and
the patient's fictional identifiers) out in a site's writing style.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import date

from shared import icd10

# code -> slot -> alternatives. Slots: complaint, symptoms, mood, thought,
# perception, risk, plan, meds, and optional substance (replaces the generic one).
CODE_VOCAB: dict[str, dict[str, tuple[str, ...]]] = {
    "F20": {
        "complaint": ("hearing voices and increasingly withdrawn behaviour", "persecutory beliefs about neighbours", "bizarre behaviour noticed by family", "fears of being watched that keep {him} indoors", "disorganised speech and self-neglect", "a first presentation of psychotic symptoms"),
        "symptoms": ("third-person voices commenting on {his} actions", "the belief that neighbours monitor {him} through the television", "thought broadcasting", "the conviction that a neighbour removes {his} thoughts", "persecutory delusions involving the police", "social withdrawal over {dur}", "marked self-neglect with poor hygiene", "voices telling {him} that {he} is worthless", "ideas of reference from car number plates", "disorganised, tangential speech", "blunted emotional responses noticed by family", "a decline in functioning after stopping work", "passivity experiences of {his} limbs being moved by an outside force", "night-time pacing and a reversed sleep pattern", "stopping antipsychotic medication {few} months ago"),
        "mood": ("'fine', with blunted affect", "'okay', affect restricted and incongruent", "guarded, affect flat"),
        "thought": ("persecutory delusions about neighbours held with full conviction", "loosening of associations with tangential answers", "delusions of control and thought insertion", "ideas of reference and thought broadcasting"),
        "perception": ("appeared to respond to unseen stimuli", "second- and third-person auditory hallucinations", "voices heard during the interview"),
        "risk": ("command hallucinations to harm others, which {he} says {he} resists", "risk of self-neglect through disorganisation", "limited insight raising the risk of disengagement", "moderate risk to others given persecutory beliefs about a neighbour"),
        "plan": ("referral to the early intervention in psychosis team", "antipsychotic titration with ECG, weight and metabolic bloods", "a care coordinator and weekly home visits", "family intervention for psychosis", "a depot if adherence remains poor", "clozapine if two antipsychotics fail"),
        "meds": ("olanzapine 10 mg at night", "risperidone 2 mg twice daily", "aripiprazole 15 mg daily", "paliperidone depot monthly", "amisulpride 200 mg twice daily", "clozapine 300 mg daily"),
    },
    "F25": {
        "complaint": ("psychotic symptoms alongside a severe mood disturbance", "a relapse of voices with marked low mood", "grandiose beliefs and elation with hearing voices", "deteriorating mood and paranoid ideas"),
        "symptoms": ("mood-congruent voices saying {he} deserves punishment", "grandiose beliefs of a special mission with pressured speech", "persecutory delusions that persist between mood episodes", "low mood and early wakening in the same episode as the voices", "a reduced need for sleep with religious delusions", "periods of elation that coincide with hallucinations", "psychotic symptoms for {few} weeks without mood symptoms", "recurrent admissions with mixed affective and psychotic features", "irritability and overspending as the voices began", "guilt and a belief that {his} food is poisoned", "poor concentration and withdrawal between episodes"),
        "mood": ("'up and down', affect labile", "'terrible', affect depressed and perplexed", "elated and irritable, at times incongruent"),
        "thought": ("grandiose and persecutory delusions with marked mood disturbance", "nihilistic delusions with mood-congruent content", "flight of ideas with paranoid content"),
        "perception": ("second-person derogatory voices", "auditory hallucinations within and outside mood episodes", "visual disturbances at night"),
        "risk": ("suicidal ideation in depressive phases combined with psychosis", "risk of financial exploitation when elevated", "a previous overdose during a mixed episode"),
        "plan": ("an antipsychotic combined with a mood stabiliser", "lithium level, renal and thyroid function", "psychoeducation on early warning signs", "a relapse plan shared with family", "care coordination by the community psychosis team"),
        "meds": ("lithium carbonate 800 mg at night", "sodium valproate 500 mg twice daily", "paliperidone 6 mg daily", "quetiapine 400 mg at night", "olanzapine 15 mg at night", "aripiprazole 20 mg daily"),
    },
    "F31": {
        "complaint": ("mood swings with episodes of elation", "overspending and reduced sleep", "recurrent manic and depressive episodes", "elevated mood after a bereavement", "depression with a past history of mania"),
        "symptoms": ("periods of elated mood lasting {few} weeks", "a reduced need for sleep, managing on {hours} hours a night", "pressured speech noticed by {his} partner", "spending {money} pounds on credit in one week", "grandiose plans to start several businesses", "disinhibition and increased libido", "racing thoughts", "irritability and arguments at work", "a later depressive phase with hypersomnia", "{few} previous manic episodes", "mood swings from elation to despair over weeks", "an admission for mania in {year}", "starting many projects without finishing them"),
        "mood": ("'on top of the world', affect elated and expansive", "'never better', affect euphoric and labile", "irritable, affect labile", "'low again', affect depressed after a recent high"),
        "thought": ("flight of ideas with grandiose themes", "grandiose ideas of special talents", "pressure of thought with rapid shifts of topic"),
        "risk": ("financial risk from impulsive spending", "risk of exploitation when disinhibited", "suicidal thoughts in past depressive phases", "risky driving when elevated"),
        "plan": ("a mood stabiliser with three-monthly lithium levels", "a mood diary and regular sleep", "group psychoeducation for bipolar disorder", "an advance statement for future manic episodes", "no antidepressant without a mood stabiliser"),
        "meds": ("lithium carbonate 1000 mg at night", "sodium valproate 750 mg twice daily", "quetiapine 300 mg at night", "lamotrigine 200 mg daily", "olanzapine 10 mg at night", "aripiprazole 15 mg daily"),
    },
    "F32": {
        "complaint": ("low mood and loss of interest", "tearfulness and poor sleep", "a first episode of depression after losing {his} job", "withdrawal from friends and loss of motivation", "persistent sadness and fatigue"),
        "symptoms": ("pervasive low mood on most days", "anhedonia, having given up {hobby}", "early morning wakening around 4 am", "poor appetite with {kg} kg weight loss", "fatigue and loss of energy", "poor concentration at work", "feelings of worthlessness and guilt", "tearfulness most days", "social withdrawal", "hopelessness about the future", "mood worse in the mornings", "psychomotor slowing noticed by family", "passive thoughts that life is not worth living", "loss of libido"),
        "mood": ("'low', affect depressed and restricted", "'empty', affect flat with little reactivity", "'miserable', tearful at interview", "'down', affect reactive but sad"),
        "thought": ("negative thoughts about self and future", "guilt and worthlessness without psychotic features", "hopelessness without delusions"),
        "risk": ("passive death wishes without plan or intent", "no self-harm history, with {his} children as protective factors", "hopelessness, so a safety plan was agreed", "no active suicidal ideation"),
        "plan": ("an SSRI with a tolerability review in two weeks", "referral for cognitive behavioural therapy", "behavioural activation with an activity schedule", "PHQ-9 at each review", "sleep hygiene advice"),
        "meds": ("sertraline 50 mg daily", "citalopram 20 mg daily", "mirtazapine 15 mg at night", "fluoxetine 20 mg daily", "escitalopram 10 mg daily"),
    },
    "F33": {
        "complaint": ("a further episode of low mood", "relapse of depression after stopping medication", "recurrent depression not responding to treatment", "a third depressive episode in {few} years"),
        "symptoms": ("a recurrence of low mood like previous episodes", "{few} earlier depressive episodes with recovery in between", "anhedonia and withdrawal from {hobby}", "relapse after stopping {his} antidepressant", "hypersomnia and heavy fatigue", "indecisiveness and poor concentration", "guilt about being a burden to family", "reduced appetite", "hopelessness that the depression keeps returning", "no history of elevated mood or mania", "worsening each winter", "a good response to antidepressants in the past", "early wakening with mood worst in the morning"),
        "mood": ("'low again', affect depressed", "'flat', affect restricted", "'hopeless', affect tearful"),
        "thought": ("pessimism about recovery given the recurrent course", "guilt and worthlessness without psychotic features", "ruminative negative thinking"),
        "risk": ("a previous overdose in a past episode", "chronic passive suicidal ideation without a current plan", "previous attempts, so crisis numbers were given"),
        "plan": ("restarting the antidepressant that helped before", "maintenance treatment for at least two years", "mindfulness-based cognitive therapy for relapse prevention", "lithium augmentation if there is no response", "relapse signature work"),
        "meds": ("sertraline 100 mg daily", "venlafaxine 150 mg modified release", "escitalopram 15 mg daily", "mirtazapine 30 mg at night", "vortioxetine 10 mg daily", "lithium 400 mg as augmentation"),
    },
    "F41.0": {
        "complaint": ("recurrent panic attacks", "emergency attendances with chest pain attributed to panic", "sudden episodes of intense fear", "avoidance of public transport after panic attacks"),
        "symptoms": ("sudden palpitations, sweating and breathlessness", "{few} panic attacks a week lasting about ten minutes", "fear of dying or going mad during attacks", "anticipatory anxiety about the next attack", "avoidance of supermarkets and buses", "tingling hands and dizziness", "chest tightness with normal cardiac tests", "attacks out of the blue, including at night", "repeated emergency department visits", "a sense of unreality during attacks", "safety behaviours such as sitting near exits"),
        "mood": ("'anxious', affect anxious but reactive", "'on edge', affect mildly anxious", "'dreading the next one', affect anxious"),
        "thought": ("catastrophic misreading of bodily sensations", "preoccupation with the fear of another attack", "no obsessions or delusions"),
        "risk": ("growing avoidance but no suicidal ideation", "risk of benzodiazepine dependence if used long term", "low risk to self"),
        "plan": ("CBT for panic with interoceptive exposure", "psychoeducation on the physiology of panic", "an SSRI started low and increased slowly", "no benzodiazepines", "graded exposure to avoided places"),
        "meds": ("sertraline 25 mg daily rising to 50 mg", "escitalopram 5 mg daily", "citalopram 10 mg daily", "paroxetine 20 mg daily"),
    },
    "F41.1": {
        "complaint": ("constant worry", "anxiety about everyday matters", "tension and poor sleep from worrying", "excessive worry about health and money"),
        "symptoms": ("excessive worry about family, money and health", "difficulty controlling the worry", "muscle tension in the neck and shoulders", "restlessness and feeling keyed up", "trouble falling asleep because of worry", "irritability", "poor concentration", "fatigue by the afternoon", "worry on most days for over {few} months", "tension headaches", "reassurance seeking from {his} partner", "catastrophising about minor problems"),
        "mood": ("'worried all the time', affect anxious", "'tense', affect anxious and restless", "'wound up', affect anxious"),
        "thought": ("multiple worries that are hard to dismiss", "catastrophic predictions about everyday events", "intolerance of uncertainty without obsessions"),
        "risk": ("no risk to self identified", "stress-related drinking to be monitored", "no suicidal ideation"),
        "plan": ("guided self-help for generalised anxiety", "individual CBT for worry", "applied relaxation", "GAD-7 at each review", "an SSRI if therapy alone is not enough"),
        "meds": ("sertraline 50 mg daily", "duloxetine 60 mg daily", "pregabalin 75 mg twice daily", "escitalopram 10 mg daily", "venlafaxine 75 mg modified release"),
    },
    "F42": {
        "complaint": ("intrusive thoughts and checking rituals", "time-consuming handwashing", "obsessions about contamination", "distressing intrusive images"),
        "symptoms": ("obsessions about contamination by germs", "handwashing up to {many} times a day with cracked skin", "checking doors and appliances for {hours} hours a day", "unwanted intrusive thoughts of harming others that {he} finds abhorrent", "a need for symmetry and ordering", "counting rituals", "reassurance seeking from family", "avoidance of public toilets", "recognition that the thoughts are excessive", "rituals making {him} late for work", "mental neutralising by repeating phrases", "doubts about having locked the car"),
        "mood": ("'stressed', affect anxious", "'fed up with the rituals', affect anxious and mildly low", "'tense', affect anxious"),
        "thought": ("ego-dystonic obsessions about contamination", "intrusive harm thoughts recognised as {his} own", "obsessional doubts with good insight"),
        "risk": ("no intent to act on intrusive harm thoughts", "skin damage from repeated washing", "low risk to self and others"),
        "plan": ("CBT with exposure and response prevention", "a high-dose SSRI for a twelve-week trial", "Y-BOCS to track severity", "advice to family to reduce reassurance"),
        "meds": ("fluoxetine 40 mg daily", "sertraline 150 mg daily", "fluvoxamine 100 mg daily", "clomipramine 75 mg daily"),
    },
    "F43.1": {
        "complaint": ("flashbacks and nightmares after an assault", "symptoms following a road traffic collision", "trauma symptoms after military service", "hypervigilance and nightmares after a workplace incident"),
        "symptoms": ("intrusive memories of {trauma}", "vivid flashbacks triggered by sudden noises", "nightmares of the event {few} nights a week", "avoidance of reminders of {trauma}", "hypervigilance and checking exits", "an exaggerated startle response", "emotional numbing", "guilt about the event", "irritability and angry outbursts", "broken sleep because of nightmares", "detachment from friends", "avoidance of driving since the event"),
        "mood": ("'on edge', affect anxious and guarded", "'numb', affect restricted", "'exhausted', affect anxious"),
        "thought": ("preoccupation with the traumatic event", "self-blame about the trauma", "intrusive memories without psychotic features"),
        "perception": ("flashbacks described as reliving the event, no hallucinations",),
        "risk": ("drinking to get to sleep", "passive suicidal thoughts after nightmares", "irritability with a risk of conflict at home"),
        "plan": ("trauma-focused CBT", "referral for EMDR", "grounding and stabilisation techniques", "sleep management", "PCL-5 monitoring"),
        "meds": ("sertraline 100 mg daily", "paroxetine 20 mg daily", "venlafaxine 75 mg modified release", "prazosin for nightmares", "mirtazapine 15 mg at night"),
    },
    "F10.2": {
        "complaint": ("harmful drinking and withdrawal symptoms", "alcohol dependence after a hospital admission", "a request for help with drinking", "abnormal liver tests and heavy drinking"),
        "symptoms": ("drinking around {units} units of alcohol a day", "morning drinking to settle a tremor", "withdrawal sweats and shaking", "strong cravings", "loss of control once drinking starts", "a narrowed drinking repertoire", "a previous withdrawal seizure", "continued drinking despite abnormal liver tests", "a drink-driving conviction", "a relationship breakdown linked to drinking", "increased tolerance", "failed attempts to cut down", "alcohol-related blackouts"),
        "mood": ("'low because of the drink', affect mildly low", "'ashamed', affect reactive", "'okay', affect euthymic"),
        "thought": ("ambivalence about stopping drinking", "preoccupation with alcohol", "no psychotic features, some guilt about drinking"),
        "risk": ("risk of withdrawal seizures if stopping abruptly", "risk of Wernicke's encephalopathy", "accidents when intoxicated", "higher suicide risk when intoxicated"),
        "plan": ("medically assisted withdrawal", "thiamine supplementation", "referral to the community alcohol service", "relapse prevention medication after detoxification", "AUDIT score and liver function tests"),
        "meds": ("a chlordiazepoxide reducing regimen", "thiamine 100 mg three times daily", "acamprosate 666 mg three times daily", "naltrexone 50 mg daily", "disulfiram 200 mg daily"),
        "substance": ("drinks about {units} units a day, mainly strong cider", "drinks spirits daily, around {units} units, since {year}", "takes the first drink of the day on waking, roughly {units} units daily"),
    },
    "F50.0": {
        "complaint": ("significant weight loss and food restriction", "restrictive eating and excessive exercise", "family concern about weight loss", "a low body mass index found by the GP"),
        "symptoms": ("restriction to about {kcal} calories a day", "weight loss of {kg} kg over {dur}", "a body mass index of {bmi}", "an intense fear of weight gain", "seeing {him}self as overweight despite low weight", "exercising for {hours} hours a day", "food rituals such as cutting food into small pieces", "avoidance of eating in front of others", "dizziness on standing", "always feeling cold", "weighing {him}self several times a day", "occasional self-induced vomiting", "preoccupation with counting calories"),
        "mood": ("'anxious about eating', affect anxious", "'fine', affect restricted", "'low', affect flat"),
        "thought": ("overvalued ideas about shape and weight", "fear of weight gain", "preoccupation with food and calories"),
        "risk": ("medical risk from low weight needing bloods and ECG", "risk of refeeding syndrome", "physical instability on standing"),
        "plan": ("referral to the specialist eating disorder service", "weekly weight and physical monitoring", "dietitian input with a meal plan", "a medical risk assessment for low weight", "family-based treatment", "enhanced CBT for eating disorders"),
        "meds": ("no psychotropic medication", "multivitamin and phosphate supplements", "olanzapine 2.5 mg at night"),
    },
    "F60.3": {
        "complaint": ("repeated self-harm and emotional instability", "an overdose after a relationship breakdown", "chronic emptiness and intense anger", "crisis presentations with self-harm"),
        "symptoms": ("self-harm by cutting {few} times in the past month", "intense and unstable relationships", "fear of abandonment", "chronic feelings of emptiness", "mood changes within hours", "impulsive spending and binge eating", "episodes of intense anger", "recurrent overdoses", "an unstable sense of self", "transient paranoia under stress", "dissociation under stress", "childhood adversity"),
        "mood": ("'empty', affect labile", "'angry', affect reactive and labile", "'all over the place', affect labile and tearful"),
        "thought": ("fears of abandonment and self-criticism", "transient paranoid ideas under stress without psychosis", "chronic suicidal thoughts"),
        "risk": ("chronic self-harm risk that rises after interpersonal crises", "previous overdoses", "impulsive acts when intoxicated"),
        "plan": ("dialectical behaviour therapy", "an agreed crisis plan", "avoiding polypharmacy", "structured clinical management", "mentalization-based treatment"),
        "meds": ("no regular psychotropic medication", "sertraline 50 mg daily for low mood", "quetiapine 25 mg short term in crisis"),
    },
    "F90.0": {
        "complaint": ("inattention and restlessness", "long-standing difficulties with concentration", "an assessment for ADHD", "impulsivity and disorganisation"),
        "symptoms": ("difficulty sustaining attention since childhood", "frequently losing things", "forgetfulness in daily tasks", "fidgeting and restlessness", "interrupting others", "impulsive decisions", "difficulty organising tasks", "leaving tasks unfinished", "school reports calling {him} easily distracted", "difficulty waiting {his} turn", "hyperactivity", "poor time management", "traffic offences through inattention"),
        "mood": ("'fine', affect euthymic", "'frustrated', affect reactive", "'okay', affect euthymic and fidgety"),
        "thought": ("no abnormal thought content", "distractible during the interview", "normal thought form"),
        "risk": ("accidents linked to impulsivity", "no risk to self", "a raised risk of substance misuse"),
        "plan": ("a stimulant trial with blood pressure, pulse and weight monitoring", "ADHD coaching", "adjustments at school or work", "Conners rating scales", "psychoeducation about ADHD"),
        "meds": ("methylphenidate modified release 36 mg", "lisdexamfetamine 30 mg daily", "atomoxetine 40 mg daily", "guanfacine 1 mg daily"),
    },
}

# Typical ages (years) per code, so e.g. ADHD and anorexia skew young.
AGES: dict[str, tuple[int, int]] = {
    "F20": (18, 55), "F25": (20, 60), "F31": (18, 65), "F32": (18, 75), "F33": (25, 75),
    "F41.0": (18, 60), "F41.1": (18, 70), "F42": (16, 55), "F43.1": (18, 65), "F10.2": (25, 70),
    "F50.0": (14, 35), "F60.3": (18, 45), "F90.0": (7, 40),
}

# Plausible comorbidities (secondary codes) per primary code.
COMORBID: dict[str, tuple[str, ...]] = {
    "F20": ("F10.2",), "F25": ("F10.2",), "F31": ("F10.2", "F41.1"), "F32": ("F41.1", "F10.2"),
    "F33": ("F41.1",), "F41.0": ("F32",), "F41.1": ("F32",), "F42": ("F32",), "F43.1": ("F10.2", "F32"),
    "F10.2": ("F32", "F41.1"), "F50.0": ("F42", "F32"), "F60.3": ("F10.2", "F43.1"), "F90.0": ("F41.1",),
}

GENERIC: dict[str, tuple[str, ...]] = {
    "source": ("general practitioner", "emergency department", "community mental health team", "student health service", "occupational health", "acute medical ward", "crisis team"),
    "past": ("no previous contact with mental health services", "one previous admission in {year}", "counselling in {year} with some benefit", "outpatient follow-up from {year} to the present", "a brief contact with the crisis team in {year}", "no past psychiatric history of note"),
    "substance": ("drinks alcohol socially within recommended limits", "denies illicit drug use", "smokes about {many} cigarettes a day", "used cannabis occasionally as a teenager", "drinks rarely and denies drugs", "has used no cannabis in the past year"),
    "living": ("lives alone in a rented flat", "lives with {his} partner and two children", "lives with {his} parents", "lives in shared accommodation", "lives with a supportive partner", "lives in supported housing"),
    "work": ("works as a delivery driver", "is a primary school teacher", "is unemployed", "works in a call centre", "is a university student", "works part-time in retail", "is retired", "works as a nurse", "is on sick leave from an office job", "attends secondary school"),
    "hobby": ("football", "painting", "running", "playing the guitar", "gardening", "swimming", "reading", "seeing friends"),
    "trauma": ("a road traffic collision", "a physical assault", "a house fire", "a military deployment", "an armed robbery at work", "a serious fall at work"),
    "appearance": ("casually dressed with adequate self-care", "appropriately dressed, well groomed", "dishevelled with poor self-care", "neatly dressed, appeared {his} stated age", "tired-looking, adequately dressed"),
    "behaviour": ("good eye contact and rapport", "guarded but cooperative", "restless at times", "calm and engaged", "reduced eye contact, polite"),
    "speech": ("normal rate, tone and volume", "quiet with reduced spontaneity", "coherent and relevant", "slightly rapid but interruptible", "normal in rate and rhythm"),
    "perception": ("no perceptual abnormalities", "no hallucinations reported or observed", "denies hallucinations"),
    "cognition": ("alert and fully oriented", "orientated to time, place and person", "grossly intact cognition", "attention and memory grossly intact"),
    "insight": ("good insight", "partial insight", "limited insight", "insight present and accepts help"),
    "risk": ("no current suicidal intent or plan", "no thoughts of harming others", "protective factors include family support", "no history of violence", "engages well with services", "future-oriented, with plans for the coming weeks"),
    "progress": ("some improvement since the last review", "little change since the last appointment", "a partial response to treatment so far", "a setback over the past fortnight", "steady progress, attending all appointments", "mixed progress with good and bad weeks"),
    "plan": ("liaise with the GP", "review in {few} weeks", "blood tests including full blood count", "crisis numbers provided", "psychoeducation given", "letter to the patient with the plan", "review by the team psychologist"),
}

# Public split only: generic history sentences with no code-specific symptom.
PUBLIC: dict[str, tuple[str, ...]] = {
    "referral": ("The patient was referred for a psychiatric assessment.", "The patient was referred for assessment of mental health difficulties.", "Referral was made for a specialist opinion on diagnosis and treatment.", "The patient attended for an initial psychiatric evaluation."),
    "history": ("The presenting difficulties were explored in detail.", "Symptoms have developed over recent months and affect daily functioning.", "The patient described how the difficulties affect work and relationships.", "Onset, course and severity of symptoms were reviewed.", "Symptoms were reviewed against diagnostic criteria.", "Collateral history was obtained where available.", "The impact on sleep, appetite and energy was discussed.", "Previous episodes and treatments were reviewed."),
    "mood": ("Mood and affect were assessed.", "Mood was described in the patient's own words.", "Affect was observed during the interview."),
    "thought": ("Thought form and content were examined.", "Thought content was explored.", "Thought form was assessed."),
    "diagnosis": ("The presentation meets criteria for", "The working diagnosis is", "The findings are consistent with", "Diagnosis:"),
}

FICTIONAL_MARKER = "[FICTIONAL DEMO RECORD]"
DOCTORS = ("Pemberton-Fisk", "Okonkwo-Hale", "Castellane", "Ravensworth", "Mbeki-Lowe", "Tregarthen")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def dob_text(site: str, dob: date) -> str:
    if site == "site-a":
        return dob.strftime("%d/%m/%Y")
    if site == "site-b":
        return f"{dob.day} {MONTHS[dob.month - 1]} {dob.year}"
    return dob.isoformat()

def pronouns(female: bool | None) -> dict[str, str]:
    he, his, him = {True: ("she", "her", "her"), False: ("he", "his", "him"), None: ("they", "their", "them")}[female]
    return {"he": he, "his": his, "him": him, "He": he.capitalize(), "His": his.capitalize()}


def slots(rng: random.Random, female: bool | None, year: int) -> dict[str, str]:
    unit = rng.choice(("weeks", "months", "months", "years"))
    return {
        **pronouns(female),
        "few": str(rng.randint(2, 6)), "many": str(rng.randint(8, 25)), "hours": str(rng.randint(2, 5)),
        "units": str(rng.randint(15, 60)), "kg": str(rng.randint(4, 15)), "kcal": str(rng.randrange(300, 900, 50)),
        "bmi": f"{rng.uniform(13.5, 17.4):.1f}", "money": f"{rng.randrange(2, 40) * 250:,}",
        "year": str(rng.randint(year - 12, year - 1)), "dur": f"{rng.choice(NUMBERS)} {unit}",
        "hobby": rng.choice(GENERIC["hobby"]), "trauma": rng.choice(GENERIC["trauma"]),
    }


def pick(rng: random.Random, bank: Sequence[str], slots: dict[str, str], k: int = 1) -> list[str]:
    return [p.format_map(slots) for p in rng.sample(list(bank), min(k, len(bank)))]


def one(rng: random.Random, bank: Sequence[str], slots: dict[str, str]) -> str:
    return pick(rng, bank, slots)[0]


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def terse(text: str) -> str:
    for long, short in ((" twice daily", " BD"), (" daily", " OD"), (" at night", " nocte")):
        text = text.replace(long, short)
    return text


def render_a(c: dict) -> str:
    """site-a: terse bullet-like liaison note with abbreviations."""
    sex = "F" if c['female'] else "M"
    lines = [FICTIONAL_MARKER, f"ASHCOMBE VALE GH | PSYCH LIAISON | {c['date'].isoformat()}",
             f"Pt: {c['name']} | MRN {c['mrn']} | DOB {c['dob']} | {c['age']}{sex}"]
    if c["show_contact"]:
        lines.append(f"Addr: {c['address']} | Tel: {c['phone']}")
    n, unit = c["dur"].split()
    count = NUMBERS.index(n) + 2
    dur = f"{count} yrs" if unit == "years" else f"{count}/{52 if unit == 'weeks' else 12}"
    if c["followup"]:
        lines.append(f"F/U r/v: c/o {c['complaint']}. {cap(c['progress'])}.")
    else:
        lines.append(f"RFR: ref by {c['source']} - c/o {c['complaint']} x {dur}.")
    lines += [f"HPC: {'; '.join(c['symptoms'])}.", f"PPH: {c['past']}.", f"SUBST: {'; '.join(c['substance'])}.",
              f"SHx: {c['living']}; {c['work']}." + (f" {c['canary']}" if c["canary"] else ""),
              f"MSE: {cap(c['appearance'])}. {cap(c['behaviour'])}. Speech {c['speech']}. Mood {c['mood']}. "
              f"TC: {c['thought']}. Perc: {c['perception']}. Cog: {c['cognition']}. Ins: {c['insight']}.",
              f"RISK: {'; '.join(c['risk'])}. Overall {c['risk_level']}.",
              "Imp: " + "; ".join(f"{code} {desc}" for code, desc in c["dx"]), "Plan:"]
    lines += [f"{i}) {terse(item)}" for i, item in enumerate(c["plan"], 1)]
    lines.append(f"r/v {c['review_weeks']}/52.")
    return "\n".join(lines)


_CONNECT = ("{He} went on to describe", "Alongside this {he} reported", "{His} family have noticed",
            "In addition {he} reported", "{He} also mentioned", "On further questioning {he} described")


def render_b(c: dict, rng: random.Random) -> str:
    """site-b: long narrative clinic letter."""
    s = c["slots"]
    when = f"{c['date'].day} {MONTHS[c['date'].month - 1]} {c['date'].year}"
    contact = f"{c['address']}, telephone {c['phone']}" if c["show_contact"] else c['address']
    who = "woman" if c['female'] else "man"
    if c["followup"]:
        opening = (f"I reviewed {c['name']} in clinic on {when} for follow-up of {c['complaint']}. "
                   f"There has been {c['progress']}.")
    else:
        opening = (f"Thank you for referring {c['name']}, a {c['age']}-year-old {who} whom I saw in clinic on {when}. "
                   f"{s['He']} was referred by the {c['source']} because of {c['complaint']}, present for about {c['dur']}.")
    sym = c["symptoms"]
    history = f"{s['He']} described {sym[0]}. " + " ".join(
        f"{lead.format_map(s)} {item}." for lead, item in zip(rng.sample(_CONNECT, len(sym) - 1), sym[1:], strict=True))
    social = (f"{cap(c['past'])}. As regards substance use, {s['he']} {join(c['substance'])}. "
              f"Socially, {s['he']} {c['living']} and {c['work']}." + (f" {c['canary']}" if c["canary"] else ""))
    mse = (f"On mental state examination {s['he']} presented as {c['appearance']} ({c['behaviour']}). Speech was "
           f"{c['speech']}. {s['He']} described {s['his']} mood as {c['mood']}. With regard to thought, "
           f"{c['thought']}; with regard to perception, {c['perception']}. Cognitive screen: {c['cognition']}. "
           f"Insight: {c['insight']}.")
    risk = f"In terms of risk, I noted {join(c['risk'])}. Overall I would regard the current risk as {c['risk_level']}."
    dx = "; ".join(f"{code} ({desc})" for code, desc in c["dx"])
    plan = (f"I have recommended {c['plan'][0]}, together with {join(c['plan'][1:])}. "
            f"I will see {s['him']} again in {c['review_weeks']} weeks.")
    return "\n\n".join([
        FICTIONAL_MARKER + "\nBrindlemoor Community Mental Health Centre",
        f"Re: {c['name']}, DOB {c['dob']}, hospital number {c['mrn']}\n{contact}",
        f"Dear Dr {c['doctor']},", opening, history, social, mse, risk,
        f"My diagnosis is {dx}.", plan,
        f"Yours sincerely,\nDr {rng.choice(DOCTORS)}, Consultant Psychiatrist",
    ])


def render_c(c: dict) -> str:
    """site-c: structured form with one 'Field: value' per line."""
    kind = "Follow-up review" if c["followup"] else "Initial assessment"
    dx = c["dx"]
    fields = [("Patient Name", c['name']), ("Medical Record Number", c['mrn']),
              ("Date of Birth", c['dob'])]
    if c["show_contact"]:
        fields += [("Address", c['address']), ("Telephone", c['phone'])]
    fields += [("Assessment Date", c["date"].isoformat()), ("Age", str(c["age"])),
               ("Sex", "Female" if c['female'] else "Male"), ("Referral Source", cap(c["source"])),
               ("Reason for Referral", cap(c["complaint"])),
               ("Duration" if not c["followup"] else "Progress", c["dur"] if not c["followup"] else cap(c["progress"])),
               ("Presenting Symptoms", "; ".join(c["symptoms"])), ("Past Psychiatric History", cap(c["past"])),
               ("Substance Use", cap("; ".join(c["substance"]))),
               ("Social History", f"{cap(c['living'])}; {c['work']}." + (f" {c['canary']}" if c["canary"] else "")),
               ("MSE Appearance/Behaviour", f"{cap(c['appearance'])}; {c['behaviour']}"),
               ("MSE Speech", cap(c["speech"])), ("MSE Mood/Affect", c["mood"]),
               ("MSE Thought", cap(c["thought"])), ("MSE Perception", cap(c["perception"])),
               ("MSE Cognition", cap(c["cognition"])), ("MSE Insight", cap(c["insight"])),
               ("Risk Level", c["risk_level"].capitalize()), ("Risk Factors", cap("; ".join(c["risk"]))),
               ("Primary Diagnosis", f"{dx[0][0]} - {dx[0][1]}"),
               ("Secondary Diagnosis", f"{dx[1][0]} - {dx[1][1]}" if len(dx) > 1 else "None"),
               ("Management Plan", cap("; ".join(c["plan"]))), ("Next Review", f"{c['review_weeks']} weeks")]
    head = [FICTIONAL_MARKER, f"CORRIN BAY SPECIALIST CLINIC - FORM MH-EVAL-3 ({kind})"]
    return "\n".join(head + [f"{k}: {v}" for k, v in fields])


def render_public(rng: random.Random, code: str) -> str:
    s = slots(rng, rng.choice((True, False, None)), 2022)
    draw = lambda bank, k=1: pick(rng, bank, s, k)  # noqa: E731
    history = " ".join(draw(PUBLIC["history"], rng.randint(2, 3)))
    history += (f" Past history: {draw(GENERIC['past'])[0]}. Substance use: {join(draw(GENERIC['substance'], 2))}."
                f" Socially, the patient {draw(GENERIC['living'])[0]} and {draw(GENERIC['work'])[0]}.")
    mse = (f"{cap(draw(GENERIC['appearance'])[0])}; {draw(GENERIC['behaviour'])[0]}. Speech {draw(GENERIC['speech'])[0]}. "
           f"{draw(PUBLIC['mood'])[0]} {draw(PUBLIC['thought'])[0]} {cap(draw(GENERIC['perception'])[0])}. "
           f"{cap(draw(GENERIC['cognition'])[0])}; {draw(GENERIC['insight'])[0]}.")
    return "\n\n".join([
        FICTIONAL_MARKER + "\nPsychiatric evaluation report",
        "Reason for referral\n" + draw(PUBLIC["referral"])[0],
        "History\n" + history,
        "Mental status examination\n" + mse,
        "Risk assessment\n" + cap("; ".join(draw(GENERIC["risk"], rng.randint(2, 3)))) + ".",
        f"Diagnosis\n{draw(PUBLIC['diagnosis'])[0]} {code} {icd10.describe(code)}.",
        "Plan\n" + cap("; ".join(draw(GENERIC["plan"], rng.randint(2, 4)))) + ".",
    ])
